"""A 50 MB single-row data file trains in bounded memory (issue 12: peak under 2 GB; it took 21 GB and was
killed before the formatters encoded only what max_length can hold). benchmarks/long-rows.md has the numbers."""

import json
import subprocess
import sys
from pathlib import Path

MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(code.stderr[-2000:])
print(code.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


def test_a_50_mb_row_trains_under_2_gb(tmp_path):
    words = ("sort: 3 1 2 = 1 2 3 the sky is blue. " * 1_400_000)[:50_000_000]
    rows = [{"prompt": words, "chosen": " 1 2 3", "rejected": " 3 2 1"}] + [
        {"prompt": f"sort: {i} 1 =", "chosen": f" 1 {i}", "rejected": f" {i} 1"} for i in range(2, 5)]
    data = tmp_path / "huge.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.stat().st_size > 50_000_000
    env = {"HF_HUB_OFFLINE": "1", "ALIGNKIT_LOAD_PLUGINS": "alignkit", "PATH": str(Path(sys.executable).parent),
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "alignkit", "-q", "run", "-m", "orpo",
                          f"data.train={data}", f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2",
                          "train.per_device_train_batch_size=2", "train.save_steps=null", "train.plots=false"],
                         capture_output=True, text=True, env=env, timeout=600)
    code, peak_kib = map(int, out.stdout.split())
    assert code == 0, out.stderr
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
