"""RLOO through the engine: the offline demo learns, resume after SIGKILL is bit-identical, two processes match one,
and num_iterations reuses one rollout for several optimizer steps."""

import os
import subprocess
import sys
import time
from pathlib import Path

import alignkit_rloo
import pytest

import alignkit
from alignkit.testing import plugin_manager
from helpers import ROOT, free_port, kill_at_checkpoint_then_resume, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402

# the subprocesses import this checkout (not another installed copy) and find the plugin by its entry point
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-rloo", "PATH": str(Path(sys.executable).parent),
       "PYTHONPATH": os.pathsep.join(sys.path),
       "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))}
SMALL = ["method.num_generations=4", "method.max_completion_length=8", "data.max_train_samples=48",
         "data.max_eval_samples=8", "train.per_device_eval_batch_size=8", "train.logging_steps=1",
         "train.disable_tqdm=true", "train.plots=false", "train.eval_steps=3", "method.sft_warmup_steps=0",
         "method.beta=0.05"]


def test_demo_learns_offline(tmp_path):
    """`alignkit run --method rloo`, no config: held-out mean reward up by >= 0.15 (the README's figures)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "alignkit", "-q", "run", "--method", "rloo"], cwd=tmp_path,
                          env=readme_figures.demo_env(ENV, cache=tmp_path / "cache"), capture_output=True, text=True,
                          timeout=600)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "rloo"
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 120
    assert evals[-1]["eval_reward"] - evals[0]["eval_reward"] >= 0.15, [e["eval_reward"] for e in evals]
    readme_figures.assert_demo_matches("rloo", out / "metrics.jsonl")
    assert elapsed < 300 or os.getloadavg()[0] > 3, elapsed


def cli(out, *extra, wait=True, launcher=()):
    cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "alignkit", "-q", "run", "--method", "rloo",
           *SMALL, f"train.output_dir={out}", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    args = ["train.max_steps=4", "train.save_steps=2", "train.per_device_train_batch_size=4"]
    kill_at_checkpoint_then_resume(tmp_path, cli, args)


@pytest.mark.slow  # two torchrun processes and one run: about 40 s on 2 CPU cores
def test_two_processes_match_one(tmp_path):
    """normalize_advantages and the logged reward std span the step's completions on both processes."""
    args = ["train.max_steps=2", "train.save_steps=null", "method.normalize_advantages=true"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=torchrun)
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    checked = 0
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "kl", "entropy", "eval_reward", "eval_loss", "eval_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
                checked += 1
    assert checked >= 10


def test_num_iterations_reuses_one_rollout_for_several_steps(tmp_path):
    """Two passes per rollout: the same completions, rewards and KL (scored once, at sampling time) for two optimizer
    steps, the second pass on a moved policy (ratio != 1); checkpoints only between rollouts."""
    config = {"method": {"num_generations": 4, "max_completion_length": 8, "num_iterations": 2, "beta": 0.05},
              "data": {"max_train_samples": 32, "max_eval_samples": 4},
              "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                        "logging_steps": 1, "save_steps": 1, "eval_steps": None, "eval_on_start": False,
                        "disable_tqdm": True, "plots": False, "learning_rate": 1e-2}}
    result = alignkit.run("rloo", config, plugins=plugin_manager(alignkit_rloo))
    rows = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for first, second in (rows[0:2], rows[2:4]):
        assert (first["reward"], first["kl"], first["completions/mean_length"]) == \
            (second["reward"], second["kl"], second["completions/mean_length"])
        assert first["loss"] != second["loss"]
    assert rows[1]["kl"] != rows[2]["kl"]  # a fresh rollout
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == ["checkpoint-2"]
