"""The soak run (slow, not in the default run): `pytest -m slow tests/test_soak.py`."""

import importlib.util

import pytest

from helpers import ROOT

SOAK = ROOT / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_soak_memory_flat_disk_bounded_every_checkpoint_resumes(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    figures = soak.run_soak(tmp_path / "soak")
    rss = figures["rss_mb"]
    assert max(v for k, v in rss.items() if k >= 1000) <= rss[300] + 64  # flat after warm-up (MB)
    disk = figures["disk_mb"]
    assert max(disk.values()) <= 1.5 * disk[300]  # bounded: two checkpoints, never more
    assert figures["checkpoints_left"] == ["checkpoint-1800", "checkpoint-1900"]
    assert all(r["final_step"] == soak.STEPS for r in figures["resumed"].values())
