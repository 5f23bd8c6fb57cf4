"""The reward method through the engine in subprocesses: resume after SIGKILL is bit-identical, two processes match
one. The subprocesses import the code the test runs with (PYTHONPATH passed on: a worktree's, or the installed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port, read_jsonl

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
    cli(tmp_path / "full", *args)
    killed = cli(tmp_path / "run", *args, wait=False)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "alignkit_state.json"
    while not ckpt.exists():
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    cli(tmp_path / "run", *args, "train.resume_from_checkpoint=auto")
    a, b = (load_file(str(tmp_path / "full" / "model.safetensors")),
            load_file(str(tmp_path / "run" / "model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, run = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert full[-1] == run[-1] and full[-1]["eval_accuracy"] > 0.5


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
