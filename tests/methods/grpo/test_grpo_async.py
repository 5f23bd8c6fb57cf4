"""Async rollouts with bounded staleness (issue 22, item 2): the next k steps' completions are sampled by a copy of
the policy in a worker thread while the current step trains. A run is reproducible for a given k: SIGKILL and
resume give bit-identical weights (the rollouts requested but not trained are kept in the checkpoint), two
processes match one."""

import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_grpo_engine import ENV, cli

from helpers import free_port, read_jsonl


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_staleness_one_trains_on_the_previous_policys_samples(tmp_path):
    args = ["train.max_steps=4", "train.save_steps=null", "train.per_device_train_batch_size=4"]
    cli(tmp_path / "sync", *args)
    cli(tmp_path / "one", *args, "method.max_staleness=1")
    cli(tmp_path / "frozen_sync", *args, "train.learning_rate=1e-30")
    cli(tmp_path / "frozen_one", *args, "train.learning_rate=1e-30", "method.max_staleness=1")
    # the weights never change (updates far below float32 resolution): a stale copy samples what the policy would
    frozen_one, frozen_sync = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("frozen_one", "frozen_sync"))
    assert frozen_one == frozen_sync
    sync, one = losses(tmp_path / "sync"), losses(tmp_path / "one")
    assert one[0] == sync[0]  # step 1 trains on the starting policy's samples either way
    assert one[1:] != sync[1:]  # later steps train on samples of the policy one step behind
    assert (tmp_path / "one" / "model.safetensors").is_file()


def test_sigkill_then_resume_with_rollouts_ahead_gives_bit_identical_weights(tmp_path):
    args = ["train.max_steps=6", "train.save_steps=2", "train.per_device_train_batch_size=4",
            "method.max_staleness=2"]
    cli(tmp_path / "full", *args)
    killed = cli(tmp_path / "run", *args, wait=False)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "alignkit_state.json"
    while not ckpt.exists():
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (ckpt.parent / "rollouts-ahead-0.pt").is_file()
    cli(tmp_path / "run", *args, "train.resume_from_checkpoint=auto")
    a, b = (load_file(str(tmp_path / "full" / "model.safetensors")),
            load_file(str(tmp_path / "run" / "model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(tmp_path / "full" / "metrics.jsonl")[-1] == read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]


def test_two_processes_with_rollouts_ahead_match_one(tmp_path):
    args = ["train.max_steps=3", "train.save_steps=null", "method.scale_rewards=batch", "method.max_staleness=1"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=torchrun)
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "entropy", "eval_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize(("extra", "said"), [
    (["method.num_iterations=2"], "method.max_staleness=1 trains each rollout once; it cannot be combined with "
                                  "method.num_iterations=2"),
    (["method.generation_backend=vllm"], "method.max_staleness=1 samples with transformers' generate"),
])
def test_settings_async_rollouts_cannot_run_with_are_refused_in_one_line_before_any_write(tmp_path, extra, said):
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "alignkit", "-q", "run", "--method", "grpo", "method.max_staleness=1",
                           *extra, f"train.output_dir={out}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], lines
    assert not out.exists()
