"""Two "nodes" on this machine (issue 26): two `accelerate launch` commands with --num_machines 2 and --machine_rank
0/1, meeting at 127.0.0.1 (gloo, CPU), one process each, train as one process with the same global batch: the recipe
of README's "Several machines", run here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import ARGS

from helpers import free_port, read_jsonl

ENV = {"ALIGNKIT_LOAD_PLUGINS": "alignkit", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PATH": str(Path(sys.executable).parent),
       # a worktree's code (its PYTHONPATH) rather than the installed one, when one is set
       **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}


def node(rank: int, port: int, out: Path) -> subprocess.Popen:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignkit", *ARGS,
           f"train.output_dir={out}", "train.per_device_train_batch_size=4"]
    return subprocess.Popen(cmd, env=ENV, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_nodes_train_as_one_process(tmp_path):
    port, out = free_port(), tmp_path / "two"
    nodes = [node(rank, port, out) for rank in (0, 1)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in nodes]
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"node {rank}: {err[:1500]} ... {err[-3000:]}"
    one = subprocess.run([sys.executable, "-m", "alignkit", *ARGS, f"train.output_dir={tmp_path / 'one'}",
                          "train.per_device_train_batch_size=8"], capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one, rows_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]  # each row once: only global rank 0 writes
    by_design = {"epoch", "grad_norm", "nll_loss", "logits/chosen", "logits/rejected"}  # as in test_distributed
    for a, b in zip(rows_one, rows_two):
        for key in a.keys() - by_design:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
