"""The README's `alignkit run --method reward`, as a user runs it: offline on builtin:sort-reward, held-out pair
accuracy from chance to >= 0.9 (about 15 s on 2 CPU cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402


def test_default_job_learns_offline(tmp_path):
    exe = Path(sys.executable).parent / "alignkit"
    env = readme_figures.demo_env({**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-reward"},
                                  cache=tmp_path / "cache")
    proc = subprocess.run([exe, "run", "--method", "reward"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # generous: wall time grows with a shared machine's load
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "outputs" / "reward" / "metrics.jsonl")
    accuracy = [r["eval_accuracy"] for r in rows if "eval_loss" in r]
    assert rows[0]["step"] == 0 and len(accuracy) >= 3
    assert accuracy[0] < 0.7 and accuracy[-1] >= 0.9
    assert json.loads(proc.stdout)["eval_accuracy"] == accuracy[-1]
    readme_figures.assert_demo_matches("reward", tmp_path / "outputs" / "reward" / "metrics.jsonl")
