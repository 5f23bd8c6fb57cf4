"""The SFT plugin end to end: `alignkit run --method sft` learns offline, eval metrics are exact means over the
eval set (independent of the eval batch size) equal to a float64 reference, and equal TRL's when trl is here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from alignkit_sft.data import sort_sft

import alignkit
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import ROOT, fast, read_jsonl

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_sft_with_trl  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402


def test_default_sft_job_learns_offline(tmp_path):
    exe = Path(sys.executable).parent / "alignkit"
    env = readme_figures.demo_env({**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit-sft"})  # the figures' threads
    proc = subprocess.run([exe, "run", "--method", "sft"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "sft"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    train = [r for r in rows if "loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == rows[-1]["step"]
    assert evals[-1]["eval_mean_token_accuracy"] >= 0.9
    assert evals[-1]["eval_loss"] < 0.25 * evals[0]["eval_loss"]
    assert evals[0]["eval_num_tokens"] == 0 and evals[-1]["eval_num_tokens"] == train[-1]["num_tokens"] > 0
    assert [r["num_tokens"] for r in train] == sorted(r["num_tokens"] for r in train)  # a running total
    summary = json.loads(proc.stdout)
    assert summary["eval_mean_token_accuracy"] == evals[-1]["eval_mean_token_accuracy"]
    readme_figures.assert_demo_matches("sft", out / "metrics.jsonl")  # the plugin README's table


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft-eval")
    compare_sft_with_trl.make_inputs(path, rows=5)
    return path


def float64_reference(work, data, completion_only):
    """eval_loss, eval_mean_token_accuracy, eval_entropy from the saved model's logits in float64, by hand."""
    model = tiny_model(seed=11).eval()
    tok = tiny_tokenizer()
    nll = correct = entropy = n = 0.0
    for line in (work / data).read_text().splitlines():
        row = json.loads(line)
        prompt_ids = tok(text=row["prompt"])["input_ids"]
        ids = tok(text=row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
        start = len(prompt_ids) if completion_only else 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(max(start, 1), len(ids)):
            nll -= float(logp[t - 1, ids[t]])
            correct += float(int(logp[t - 1].argmax()) == ids[t])
            entropy -= float((logp[t - 1].exp() * logp[t - 1]).sum())
            n += 1
    return {"eval_loss": nll / n, "eval_mean_token_accuracy": correct / n, "eval_entropy": entropy / n}


@pytest.mark.parametrize("completion_only", [True, False])
def test_eval_metrics_are_exact_means_equal_to_float64_reference(work, completion_only):
    expected = float64_reference(work, "standard.jsonl", completion_only)
    for batch in (5, 2):  # one batch, and uneven batches of 2, 2, 1: the same numbers
        got = alignkit.evaluate("sft", **{"model.name_or_path": str(work / "model"),
                                          "data.train": str(work / "standard.jsonl"),
                                          "train.per_device_eval_batch_size": batch,
                                          "method.completion_only_loss": completion_only,
                                          "train.output_dir": str(work / f"ak-{completion_only}-{batch}")})
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (batch, key)
        assert got["eval_num_tokens"] == 0  # nothing trained yet, as TRL logs it


def test_eval_metrics_equal_trl(work):
    cases = {k: compare_sft_with_trl.CASES[k]
             for k in ("standard-prompt-completion", "conversational-language-modeling")}
    ours = compare_sft_with_trl.alignkit_side(work, cases, batch=5)
    theirs = compare_sft_with_trl.trl_side(work, cases, batch=5)
    worst, _ = compare_sft_with_trl.compare(ours, theirs)
    assert worst <= 1e-5


def test_num_tokens_is_the_running_total_of_input_tokens(tmp_path):
    tok = tiny_tokenizer()
    config = fast(tmp_path, max_steps=8, eval_steps=4)  # 32 examples in micro-batches of 4: one epoch
    result = alignkit.run("sft", config, **{"model.name_or_path": "builtin:tiny"})
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    train = [r["num_tokens"] for r in rows if "loss" in r]
    expected = sum(len(tok(text=r["prompt"] + r["completion"] + tok.eos_token)["input_ids"])
                   for r in sort_sft("train").select(range(32)))
    assert len(train) == 8 and train == sorted(train) and train[-1] == expected
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["eval_num_tokens"] for r in evals] == [train[3], train[7]]


def test_packed_evaluation_equals_unpacked(work):
    """The whole pipeline (core formatter packing, collate, loss): packed rows give the unpacked eval metrics."""
    common = {"model.name_or_path": str(work / "model"), "data.train": str(work / "chat.jsonl"),
              "train.per_device_eval_batch_size": 2}
    plain = alignkit.evaluate("sft", **common, **{"train.output_dir": str(work / "plain")})
    packed = alignkit.evaluate("sft", **common, **{"method.packing": True, "method.max_length": 64,
                                                   "train.output_dir": str(work / "packed")})
    for key in ("eval_loss", "eval_mean_token_accuracy", "eval_entropy"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_num_tokens_survives_resume(tmp_path):
    config = fast(tmp_path, max_steps=8, save_steps=4)
    first = alignkit.run("sft", config, **{"model.name_or_path": "builtin:tiny"})
    whole = [r["num_tokens"] for r in read_jsonl(first.output_dir / "metrics.jsonl") if "loss" in r]
    checkpoint = next((first.output_dir / "checkpoints").iterdir())
    again = alignkit.run("sft", config,
                         **{"model.name_or_path": "builtin:tiny", "train.resume_from_checkpoint": str(checkpoint)})
    resumed = [r["num_tokens"] for r in read_jsonl(again.output_dir / "metrics.jsonl") if "loss" in r]
    assert resumed == whole and whole[-1] > whole[3] > 0
