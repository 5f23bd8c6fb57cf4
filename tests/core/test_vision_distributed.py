"""Issue 25, item 5 (in part): SFT of the tiny vision-language model on two CPU processes (torchrun, gloo) gives the
loss curve and eval of one process with the same global batch, images and all."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, free_port, read_jsonl

ARGS = ["-q", "run", "--method", "sft", "model.name_or_path=builtin:tiny-vlm", "data.train=builtin:shapes-sft",
        "train.max_steps=3", "train.logging_steps=1", "data.max_train_samples=24", "data.max_eval_samples=10",
        "train.per_device_eval_batch_size=4", "train.disable_tqdm=true", "train.save_steps=null",
        "train.eval_steps=3", "train.eval_on_start=false", "train.plots=false", "train.learning_rate=3e-3"]


@pytest.mark.slow  # two torchrun processes and one run: about a minute on 2 CPU cores
def test_two_processes_match_one_with_images(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    # this checkout's code in the subprocesses (a worktree's alignkit and plugins before any installed copy)
    path = os.pathsep.join([str(ROOT), *(str(p) for p in sorted((ROOT / "plugins").iterdir()) if p.is_dir())])
    env = {"ALIGNKIT_LOAD_PLUGINS": "alignkit-sft", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent), "PYTHONPATH": path,
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "alignkit",
                          *ARGS, f"train.output_dir={tmp_path / 'two'}", "train.per_device_train_batch_size=4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "alignkit", *ARGS, f"train.output_dir={tmp_path / 'one'}",
                          "train.per_device_train_batch_size=8"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one, rows_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] and len(rows_one) >= 3
    # the optimised loss is normalised by token counts over all ranks; every eval metric is pooled over the ranks
    for a, b in zip(rows_one, rows_two):
        for key in ("loss", "eval_loss", "eval_mean_token_accuracy", "eval_entropy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert any("eval_loss" in r for r in rows_one)
