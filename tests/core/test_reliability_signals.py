"""Signals during evaluation and saving (issue 12, item 17): a stop request ends an evaluation at the next
batch, a second Ctrl-C stops at once, SIGTERM is never swallowed. Real processes, real signals."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.engine import checkpoint
from helpers import read_jsonl
from test_registry import install_fake_dist

SLOW = """
    import os, time
    import torch
    import alignkit, alignkit_orpo

    class Config(alignkit_orpo.ORPOMethodConfig):
        name: str = "slow-orpo"

    class SlowEvalLoss(alignkit_orpo.ORPOLoss):
        def __call__(self, model, batch, **kw):
            if not torch.is_grad_enabled():  # evaluation: 0.3 s a batch
                time.sleep(0.3)
            return super().__call__(model, batch, **kw)

    @alignkit.hookimpl
    def register_methods(register):
        register(alignkit.Method(name="slow-orpo", config=Config, formatter="preference", loss=SlowEvalLoss,
                                 description="ORPO with a slow evaluation"))

    @alignkit.hookimpl
    def on_save(run, step, path):
        if os.environ.get("SLOW_SAVE"):
            time.sleep(120)
"""


@pytest.fixture
def slow(tmp_path):
    install_fake_dist(tmp_path, "alignkit-sloweval", "sloweval", "alignkit_sloweval_mod", SLOW)
    return tmp_path


def start(root: Path, *extra, slow_save=False):
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root),
           "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-sloweval", **({"SLOW_SAVE": "1"} if slow_save else {})}
    cmd = [sys.executable, "-m", "alignkit", "-q", "run", "--method", "slow-orpo", f"train.output_dir={root / 'out'}",
           "data.train=builtin:sort", "data.eval=builtin:sort", "data.max_train_samples=16", "data.max_eval_samples=40",
           "train.per_device_eval_batch_size=1",
           "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.disable_tqdm=true",
           "train.plots=false",
           "train.eval_on_start=false", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc, timeout=300):
    start_time = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start_time < timeout
        time.sleep(0.05)


def logged(out: Path, step: int):
    path = out / "metrics.jsonl"
    return lambda: path.exists() and any(r.get("step") == step for r in read_jsonl(path) if r)


def test_a_stop_request_ends_an_evaluation_at_the_next_batch(slow):
    proc = start(slow, "train.max_steps=4", "train.eval_steps=2", "train.save_steps=null")
    wait_until(logged(slow / "out", 2), proc)  # the step-2 row is written just before the 12 s evaluation
    time.sleep(1.0)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert time.time() - sent < 6, "the evaluation ran on after the stop request"
    assert "alignkit: stopped: SIGINT at step 2: checkpoint saved in" in err
    assert checkpoint.verify(slow / "out" / "checkpoints" / "checkpoint-2") is None
    assert not any("eval_loss" in r for r in read_jsonl(slow / "out" / "metrics.jsonl"))  # no partial eval reported


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_stays_valid(slow):
    proc = start(slow, "train.max_steps=4", "train.save_steps=2", "data.max_eval_samples=2", slow_save=True)
    ckpt = slow / "out" / "checkpoints" / "checkpoint-2"
    wait_until(ckpt.exists, proc)  # now in the 120 s on_save hook
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first asks to stop after the step
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - sent < 10, err[-2000:]
    assert "second SIGINT during step 3: stopped at once; the last complete checkpoint" in err
    assert checkpoint.verify(ckpt) is None


def test_sigterm_during_the_final_evaluation_is_not_swallowed(slow):
    proc = start(slow, "train.max_steps=2", "train.save_steps=null")
    wait_until(logged(slow / "out", 2), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "alignkit: stopped: SIGTERM at step 2 (the last), before the model was saved" in err
    assert not (slow / "out" / "model.safetensors").exists()
    resumed = start(slow, "train.max_steps=2", "train.save_steps=null", "train.resume_from_checkpoint=auto",
                    "data.max_eval_samples=2")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert (slow / "out" / "model.safetensors").is_file()
    assert [r["step"] for r in read_jsonl(slow / "out" / "metrics.jsonl") if "loss" in r] == [1, 2]
