"""distill through the engine in subprocesses, as a user runs it (the plugin as an installed entry point, this
worktree's code on PYTHONPATH): resume after SIGKILL is bit-identical and two processes match one, with steps on the
student's samples, the teacher's samples (seq_kd) and both mixed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from distill_support import PLUGIN_DIR, install_entry_point, save_teacher

from helpers import ROOT, free_port, kill_at_checkpoint_then_resume, read_jsonl

SMALL = ["method.max_new_tokens=6", "method.lmbda=0.5", "method.seq_kd=true", "data.max_train_samples=48",
         "data.max_eval_samples=8", "train.per_device_eval_batch_size=8", "train.logging_steps=1",
         "train.disable_tqdm=true", "train.plots=false", "train.eval_steps=3", "train.learning_rate=1e-2",
         "model.name_or_path=builtin:tiny", "data.train=builtin:sort-distill"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("distill-engine")
    site = install_entry_point(base / "site")
    path = [str(site), str(ROOT), *(str(p) for p in sorted((ROOT / "plugins").glob("alignkit-*"))), str(PLUGIN_DIR)]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-distill", "PATH": str(Path(sys.executable).parent),
           "PYTHONPATH": os.pathsep.join(path), "XDG_CACHE_HOME": str(base / "cache")}
    return env, save_teacher(base / "teacher", sharpen=20.0)


def cli(setup, out, *extra, wait=True, launcher=()):
    env, teacher = setup
    cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "alignkit", "-q", "run", "--method", "distill",
           *SMALL, f"model.ref_name_or_path={teacher}", f"train.output_dir={out}", *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


def test_sigkill_then_resume_gives_bit_identical_weights(setup, tmp_path):
    args = ["train.max_steps=6", "train.save_steps=2", "train.per_device_train_batch_size=4"]
    kill_at_checkpoint_then_resume(tmp_path, lambda out, *a, **kw: cli(setup, out, *a, **kw), args)


@pytest.mark.slow  # two torchrun processes and one run: about 40 s on 2 CPU cores
def test_two_processes_match_one(setup, tmp_path):
    args = ["train.max_steps=4", "train.save_steps=null"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    cli(setup, tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=torchrun)
    cli(setup, tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    compared = 0
    for a, b in zip(one, two):
        for key in ("loss", "kl_teacher_student", "token_agreement", "eval_loss", "eval_kl_teacher_student",
                    "eval_token_agreement"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
                compared += 1
    assert compared >= 12
