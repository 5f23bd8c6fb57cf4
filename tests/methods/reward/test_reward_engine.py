"""The reward method through the engine in subprocesses: resume after SIGKILL is bit-identical, two processes match
one. The subprocesses import the code the test runs with (PYTHONPATH passed on: a worktree's, or the installed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, kill_at_checkpoint_then_resume, read_jsonl

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-reward", "PATH": str(Path(sys.executable).parent),
       "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
       **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
SMALL = ["data.max_train_samples=320", "data.max_eval_samples=16", "train.per_device_eval_batch_size=8",
         "train.logging_steps=1", "train.disable_tqdm=true", "train.plots=false", "train.eval_steps=5",
         "train.learning_rate=3e-3", "method.center_rewards_coefficient=0.01"]


def cli(out, *extra, wait=True, launcher=()):
    cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "alignkit", "-q", "run", "--method", "reward",
           *SMALL, f"train.output_dir={out}", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


@pytest.mark.slow  # three runs of 40 steps in subprocesses: about 40 s on 2 CPU cores
def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    args = ["train.max_steps=40", "train.save_steps=2", "train.per_device_train_batch_size=8"]
    assert kill_at_checkpoint_then_resume(tmp_path, cli, args)["eval_accuracy"] > 0.5


def test_two_processes_match_one(tmp_path):
    args = ["train.max_steps=6", "train.save_steps=null"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=torchrun)
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    checked = 0
    for a, b in zip(one, two):
        for key in ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected", "num_tokens",
                    "eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
                checked += 1
    assert checked > 40
