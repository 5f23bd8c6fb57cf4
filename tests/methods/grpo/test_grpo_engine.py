"""GRPO through the engine: the offline demo learns, resume after SIGKILL is bit-identical, two processes
match one, and num_iterations reuses one rollout for several optimizer steps."""

import os
import subprocess
import sys
import time
from pathlib import Path

import alignkit_grpo
import pytest

import alignkit
from alignkit.config import TrainConfig
from alignkit.engine.schedule import Actions, Schedule
from alignkit.testing import plugin_manager
from helpers import ROOT, free_port, kill_at_checkpoint_then_resume, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-grpo", "PATH": str(Path(sys.executable).parent),
       "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))}
SMALL = ["method.num_generations=4", "method.max_completion_length=8", "data.max_train_samples=48",
         "data.max_eval_samples=8", "train.per_device_eval_batch_size=8", "train.logging_steps=1",
         "train.disable_tqdm=true", "train.plots=false", "train.eval_steps=3"]


def test_demo_learns_offline(tmp_path):
    """`alignkit run --method grpo`, no config: held-out reward up by >= 0.15 within 5 minutes, curve in plots/,
    the README's figures."""
    start = time.time()
    proc = subprocess.run([Path(sys.executable).parent / "alignkit", "run", "--method", "grpo"], cwd=tmp_path,
                          env=readme_figures.demo_env(ENV, cache=tmp_path / "cache"), capture_output=True, text=True,
                          timeout=600)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "grpo"
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 120
    assert evals[-1]["eval_reward"] - evals[0]["eval_reward"] >= 0.15, [e["eval_reward"] for e in evals]
    assert (out / "plots" / "reward.png").is_file()
    readme_figures.assert_demo_matches("grpo", out / "metrics.jsonl")
    assert elapsed < 300 or os.getloadavg()[0] > 3, elapsed  # measured on a quiet machine: see the README


def cli(out, *extra, wait=True, launcher=()):
    cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "alignkit", "-q", "run", "--method", "grpo",
           *SMALL, f"train.output_dir={out}", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)
    if wait:
        _, err = proc.communicate(timeout=600)
        # both ends of stderr: a rank that aborts (SIGABRT) prints its cause first, the launcher's report last
        assert proc.returncode == 0, err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"
    return proc


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    args = ["train.max_steps=6", "train.save_steps=2", "train.per_device_train_batch_size=4"]
    kill_at_checkpoint_then_resume(tmp_path, cli, args)


def test_two_processes_match_one(tmp_path):
    args = ["train.max_steps=3", "train.save_steps=null", "method.scale_rewards=batch"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=torchrun)
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "rewards/sort-order/mean", "completions/mean_length",
                    "entropy", "eval_reward", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def pm_grpo():
    return plugin_manager(alignkit_grpo)


def test_num_iterations_reuses_one_rollout_for_several_steps(tmp_path):
    pm = plugin_manager(alignkit_grpo)
    config = {"method": {"num_generations": 4, "max_completion_length": 8, "num_iterations": 2, "beta": 0.04},
              "data": {"max_train_samples": 32, "max_eval_samples": 4},
              "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                        "logging_steps": 1, "save_steps": 1, "eval_steps": None, "eval_on_start": False,
                        "disable_tqdm": True, "plots": False, "learning_rate": 1e-2}}
    result = alignkit.run("grpo", config, plugins=pm)
    rows = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for first, second in (rows[0:2], rows[2:4]):  # the same completions and rewards, a moved policy
        assert (first["reward"] == second["reward"]
                and first["completions/mean_length"] == second["completions/mean_length"])
        assert first["kl"] != second["kl"]
    assert (rows[1]["reward"] != rows[2]["reward"]
            or rows[1]["completions/mean_length"] != rows[2]["completions/mean_length"])
    # checkpoints only between rollouts: after steps 2 and 4's rollout pairs, never mid-rollout
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_an_epoch_with_num_iterations_rolls_out_every_batch_once(tmp_path, monkeypatch):
    """num_iterations=k makes an epoch k optimizer steps per window (as TRL repeats its sampler), and the epoch
    ends once, after the last window's last pass."""
    import alignkit_grpo.rollout as rollout

    seen, evals, real = [], [], rollout.GRPORollout.__call__

    def spy(self, batch, ctx):
        (seen if ctx.training else evals).append(tuple(map(str, batch["prompt"])))
        return real(self, batch, ctx=ctx)

    monkeypatch.setattr(rollout.GRPORollout, "__call__", spy)
    config = {"method": {"num_generations": 2, "max_completion_length": 4, "num_iterations": 2},
              "data": {"max_train_samples": 8, "max_eval_samples": 2},
              "train": {"output_dir": str(tmp_path / "out"), "num_train_epochs": 1, "max_steps": -1,
                        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2, "logging_steps": 1,
                        "save_steps": None, "eval_on_start": False, "disable_tqdm": True, "plots": False}}

    class EpochEnds(Schedule):
        def after_epoch(self, run):
            ends.append(run.step)
            return Actions(evaluate=True)

    ends = []
    result = alignkit.run("grpo", config, plugins=pm_grpo(), schedule=EpochEnds(TrainConfig(**config["train"])))
    assert result.global_step == 4  # 2 windows x 2 passes
    assert len(seen) == 2 and len(set(seen)) == 2  # each window rolled out once, both windows seen
    assert ends == [4]  # the epoch ended once, after the last window's last pass
    assert len(evals) == 2  # its evaluation (one eval batch) and the one at the end


def test_another_generation_backend_samples_and_gets_the_weights_after_every_step(tmp_path, monkeypatch):
    from test_grpo_rollout import FakeBackend

    import alignkit.online.rollout

    backend = FakeBackend()
    monkeypatch.setattr(alignkit.online.rollout, "backend_for", lambda name, *args: backend if name == "vllm" else None)
    config = {"method": {"num_generations": 4, "max_completion_length": 8, "generation_backend": "vllm"},
              "data": {"max_train_samples": 16, "max_eval_samples": 4},
              "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                        "logging_steps": 1, "save_steps": None, "eval_steps": None, "eval_on_start": False,
                        "disable_tqdm": True, "plots": False}}
    alignkit.run("grpo", config, plugins=plugin_manager(alignkit_grpo))
    assert len(backend.synced) == 2  # after each optimizer step
    train_calls = backend.calls[:2]
    assert all(n == 4 and max_new == 8 and len(prompts) == 4 for prompts, n, max_new, *_ in train_calls)
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert rows[0]["completions/mean_length"] == 2.0  # the backend's completions reached the loss


def test_fsdp2_on_two_processes_samples_and_trains_as_one(tmp_path):
    """Generation under FSDP2 gathers the sharded parameters once (no collective per sampled token)."""
    config = ROOT / "configs" / "accelerate" / "fsdp.yaml"
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
              "--main_process_port", str(free_port())]
    args = ["train.max_steps=2", "train.save_steps=null", "train.eval_steps=2"]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=launch)
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "reward", "eval_reward", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_an_unknown_reward_is_one_line_exit_2_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alignkit", "run", "--method", "grpo",
                           "method.reward_funcs=[exact-mach]",
                           f"train.output_dir={tmp_path / 'out'}"], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "alignkit: error: method.reward_funcs: no reward function 'exact-mach' (did you mean 'exact-match'?); "
        "registered: digits-format, exact-match, length-penalty, regex-match, sort-order, or model:PATH for a reward "
        "model, url:URL for a remote one, judge:MODEL for an LLM judge"]
    assert not (tmp_path / "out").exists()


def test_alignkit_eval_samples_and_scores_as_the_end_of_training_evaluation(tmp_path):
    pm = plugin_manager(alignkit_grpo)
    method = {"num_generations": 4, "max_completion_length": 8, "sft_warmup_steps": 0, "temperature": 1.0,
              "reward_funcs": ["sort-order", "exact-match"]}
    train = {"per_device_eval_batch_size": 4, "disable_tqdm": True, "plots": False}
    result = alignkit.run("grpo", {"method": method, "data": {"max_train_samples": 16, "max_eval_samples": 8},
                                   "train": {**train, "output_dir": str(tmp_path / "out"), "max_steps": 2,
                                             "per_device_train_batch_size": 4, "save_steps": None,
                                             "eval_steps": None, "eval_on_start": False}}, plugins=pm)
    final = read_jsonl(result.output_dir / "metrics.jsonl")[-1]
    again = alignkit.evaluate("grpo", {"model": {"name_or_path": str(result.output_dir)}, "method": method,
                                       "data": {"train": "builtin:sort-prompts", "eval": "builtin:sort-prompts",
                                                "eval_split": "test", "max_eval_samples": 8},
                                       "train": {**train, "output_dir": str(tmp_path / "eval")}}, plugins=pm)
    assert again["eval_reward"] == final["eval_reward"] and again["eval_loss"] == pytest.approx(final["eval_loss"])
