"""Two CPU processes (torchrun, gloo) give the loss curve and eval of one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, read_jsonl

ARGS = ["-q", "run", "--method", "orpo", "train.max_steps=4", "train.logging_steps=1", "data.max_train_samples=32",
        "data.max_eval_samples=10", "train.per_device_eval_batch_size=4", "train.disable_tqdm=true",
        "train.save_steps=2", "train.eval_steps=2"]


def test_two_processes_match_one(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {"ALIGNKIT_LOAD_PLUGINS": "alignkit", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent)}
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "alignkit",
                          *ARGS,
                          f"train.output_dir={tmp_path / 'two'}", "train.per_device_train_batch_size=4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "alignkit", *ARGS, f"train.output_dir={tmp_path / 'one'}",
                          "train.per_device_train_batch_size=8"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one, rows_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]  # each row once: only rank 0 writes
    # Training: token-weighted metrics (nll_loss) and the padding-dependent logits/* are each rank's own
    # mean, averaged unweighted over ranks as TRL does, so they differ from one pooled process by design.
    # The optimised loss is normalised by counts over all ranks; per-pair metrics have equal pairs per rank.
    # Eval: 10 examples in batches of 4 split 3 batches over 2 ranks (no sample repeated or dropped), and
    # every eval metric equals one process's.
    by_design = {"epoch", "grad_norm", "nll_loss", "logits/chosen", "logits/rejected"}
    for a, b in zip(rows_one, rows_two):
        for key in a.keys() - by_design:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
