"""The README's default job, exactly as a user runs it (`alignkit run --method orpo`, offline), and the demo job
of every shipped pairwise plugin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402


def test_default_job_learns_offline(tmp_path):
    exe = Path(sys.executable).parent / "alignkit"  # the console script the install put beside python
    assert exe.is_file()
    env = readme_figures.demo_env({**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit"})  # the figures' threads
    proc = subprocess.run([exe, "run", "--method", "orpo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "orpo"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == rows[-1]["step"]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    summary = json.loads(proc.stdout)
    assert summary["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    readme_figures.assert_demo_matches("orpo", out / "metrics.jsonl")  # the README's table


@pytest.mark.parametrize("method", ["dpo", "cpo", "simpo"])
def test_every_pairwise_plugin_demo_learns_offline(tmp_path, method):
    """`alignkit run --method NAME` with no config, for each shipped pairwise plugin: it trains offline on the
    demo data the plugin names and learns to rank the held-out pairs."""
    exe = Path(sys.executable).parent / "alignkit"
    env = readme_figures.demo_env({**os.environ, "ALIGNKIT_LOAD_PLUGINS": f"alignkit,alignkit-{method}"})
    proc = subprocess.run([exe, "-q", "run", "--method", method, "train.plots=false"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "outputs" / method / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[0]["step"] == 0 and len(evals) >= 3
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    readme_figures.assert_demo_matches(method, tmp_path / "outputs" / method / "metrics.jsonl")  # its README's table
