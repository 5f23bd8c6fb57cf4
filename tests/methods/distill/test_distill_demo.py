"""The README's `alignkit run --method distill`, as a user runs it (the plugin installed as an entry point): a fresh
tiny student distils the built-in teacher; held-out KL(teacher || student) falls by at least half and token
agreement with the teacher rises."""

import json
import os
import subprocess
import sys
from pathlib import Path

from distill_support import PLUGIN_DIR, install_entry_point

from helpers import ROOT, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402


def test_default_job_learns_offline(tmp_path):
    exe = Path(sys.executable).parent / "alignkit"
    site = install_entry_point(tmp_path / "site")
    path = [str(site), str(ROOT), *(str(p) for p in sorted((ROOT / "plugins").glob("alignkit-*"))), str(PLUGIN_DIR)]
    env = readme_figures.demo_env({**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-distill",
                                   "PYTHONPATH": os.pathsep.join(path)}, cache=tmp_path / "cache")
    proc = subprocess.run([exe, "run", "--method", "distill"], cwd=tmp_path / "site", env=env, capture_output=True,
                          text=True, timeout=1200)  # the teacher is built once per cache (about 15 s of CPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_jsonl(tmp_path / "site" / "outputs" / "distill" / "metrics.jsonl") if "eval_loss" in r]
    kl = [r["eval_kl_teacher_student"] for r in rows]
    agree = [r["eval_token_agreement"] for r in rows]
    assert rows[0]["step"] == 0 and len(rows) >= 3
    assert kl[-1] <= 0.5 * kl[0], kl
    assert agree[-1] > agree[0], agree
    assert json.loads(proc.stdout)["eval_kl_teacher_student"] == kl[-1]
    readme_figures.assert_demo_matches("distill", tmp_path / "site" / "outputs" / "distill" / "metrics.jsonl")
