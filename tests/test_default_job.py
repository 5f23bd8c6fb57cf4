"""The README's default job, exactly as a user runs it: `alignkit run --method orpo`, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_default_job_learns_offline(tmp_path):
    exe = Path(sys.executable).parent / "alignkit"  # the console script the install put beside python
    assert exe.is_file()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ALIGNKIT_LOAD_PLUGINS": "alignkit"}
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
