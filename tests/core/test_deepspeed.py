"""DeepSpeed ZeRO-2 and ZeRO-3 (issue 26) with the shipped accelerate config files, on 2 CPU processes (DeepSpeed's
CPU accelerator, gloo), give the run of one process with the same global batch.

DeepSpeed is not a dependency: the launches use the Python in ALIGNKIT_DEEPSPEED_PYTHON (default: this one), which
must have `pip install deepspeed`; e.g. a scratch venv that sees this one's packages. Marked `deepspeed`, outside
the default run: `ALIGNKIT_DEEPSPEED_PYTHON=PYTHON pytest -m deepspeed tests/core/test_deepspeed.py`. DeepSpeed
builds its CPU communication op on first use."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import ROOT, free_port, read_jsonl

PYTHON = os.environ.get("ALIGNKIT_DEEPSPEED_PYTHON", sys.executable)
ENV = {**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ARGS = ["-m", "alignkit", "-q", "run", "--method", "orpo", "train.max_steps=2", "data.max_train_samples=16",
        "train.disable_tqdm=true", "train.logging_steps=1", "train.save_steps=1", "data.max_eval_samples=8",
        "train.per_device_eval_batch_size=4"]


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_cpu_processes_matches_one_process(tmp_path, stage):
    found = subprocess.run([PYTHON, "-c", "import deepspeed"], capture_output=True, text=True, env=ENV)
    assert found.returncode == 0, (f"{PYTHON} has no deepspeed: pip install deepspeed, or point "
                                   "ALIGNKIT_DEEPSPEED_PYTHON at a Python that has it")
    config = ROOT / "configs" / "accelerate" / f"deepspeed-zero{stage}.yaml"
    head = ["method.loss_implementation=plain"] if stage == 3 else []  # see the config file's header
    # a saved model, not builtin:tiny: under ZeRO-3 transformers builds a model partitioned from the start
    # (deepspeed.zero.Init), whose random initial weights differ from one process's; loaded weights are equal
    tiny_model().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    head += [f"model.name_or_path={tmp_path / 'base'}", "train.learning_rate=1e-3", "train.eval_on_start=true"]
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, *ARGS, *head, "train.per_device_train_batch_size=4",
                          f"train.output_dir={tmp_path / 'two'}"], capture_output=True, text=True, env=ENV, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-1"
    shards = sorted(p.name for p in (ckpt / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in ckpt.rglob("*"))  # DeepSpeed's own sharded states: it ran
    one = subprocess.run([sys.executable, *ARGS, *head, "train.per_device_train_batch_size=8",
                          f"train.output_dir={tmp_path / 'one'}"], capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one, rows_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    wa, wb = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    # DeepSpeed's gathered state dict holds the tied head as a tensor of its own: saved once more, equal
    assert wb.keys() - wa.keys() <= {"lm_head.weight"} and wa.keys() <= wb.keys()
    if "lm_head.weight" in wb.keys() - wa.keys():
        assert torch.equal(wb["lm_head.weight"], wb["model.embed_tokens.weight"])
    # ZeRO-3 reduce-scatters the gradients in another order: Adam's normalised first steps turn those float
    # differences into weight differences up to ~2e-5 (a wrong step would differ by the order of lr, 1e-3)
    worst = max(wa, key=lambda k: float((wa[k] - wb[k]).abs().max()))
    assert torch.allclose(wa[worst], wb[worst], atol=5e-5), (worst, float((wa[worst] - wb[worst]).abs().max()))


@pytest.mark.deepspeed
def test_gradient_accumulation_under_deepspeed_is_refused_before_any_write(tmp_path):
    """accelerate steps DeepSpeed's optimizer at every micro-batch of alignkit's loop (which accumulates itself):
    with 2 micro-batches a step the run silently trained differently from its batch. Refused instead."""
    config = ROOT / "configs" / "accelerate" / "deepspeed-zero2.yaml"
    launch = [PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, *ARGS, "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
                          f"train.output_dir={tmp_path / 'two'}"], capture_output=True, text=True, env=ENV, timeout=900)
    assert two.returncode != 0
    lines = {ln for ln in two.stderr.splitlines() if ln.startswith("alignkit: error:")}  # each rank says it
    assert len(lines) == 1 and "train.gradient_accumulation_steps" in lines.pop()
    assert "[rank0]: Traceback" not in two.stderr  # the launcher reports the ranks' exit; the ranks print one line
    assert not (tmp_path / "two").exists()
