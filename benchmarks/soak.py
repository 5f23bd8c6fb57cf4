"""Soak: 2,000 steps of the built-in model with eval and checkpoints every 100 steps, save_total_limit 2.

    python benchmarks/soak.py            # writes benchmarks/soak.md
    pytest -m slow tests/core/test_soak.py    # the same run, with its assertions

Records RSS after each eval/log window and the output_dir's size after each save, then resumes from
every checkpoint that is left.
"""

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

import alignkit
import alignkit_orpo
from alignkit import hookimpl
from alignkit.testing import plugin_manager

STEPS, EVERY = 2000, 100


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Probe:
    def __init__(self):
        self.rss: dict[int, float] = {}
        self.disk: dict[int, float] = {}

    @hookimpl
    def on_log(self, run, step, logs):
        self.rss[step] = psutil.Process().memory_info().rss / 2**20

    @hookimpl
    def on_save(self, run, step, path):
        self.disk[step] = _size(run.output_dir) / 2**20


def overrides(out: Path) -> dict:
    return {"train.output_dir": str(out), "train.max_steps": STEPS, "train.logging_steps": EVERY,
            "train.eval_steps": EVERY, "train.save_steps": EVERY, "train.save_total_limit": 2,
            "train.per_device_train_batch_size": 8, "data.max_eval_samples": 50, "train.disable_tqdm": True}


def run_soak(out: Path) -> dict:
    probe = Probe()
    start = time.time()
    result = alignkit.run("orpo", plugins=plugin_manager(alignkit_orpo, probe), **overrides(out))
    seconds = time.time() - start
    left = sorted((out / "checkpoints").iterdir())
    resumed = {}
    for ckpt in left:
        copy = out.parent / f"resume-{ckpt.name}"
        shutil.copytree(out, copy)
        r = alignkit.run("orpo", plugins=plugin_manager(alignkit_orpo),
                         **{**overrides(copy), "train.resume_from_checkpoint": str(copy / "checkpoints" / ckpt.name)})
        resumed[ckpt.name] = {"final_step": r.global_step, "eval_loss": r.metrics["eval_loss"]}
    return {"seconds": seconds, "rss_mb": probe.rss, "disk_mb": probe.disk,
            "final_eval_loss": result.metrics["eval_loss"],
            "checkpoints_left": [p.name for p in left], "resumed": resumed}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        figures = run_soak(Path(tmp) / "soak")
    rss, disk = figures["rss_mb"], figures["disk_mb"]
    lines = [
        "# Soak: 2,000 steps with eval and checkpoints every 100, save_total_limit 2", "",
        "Command: `python benchmarks/soak.py` (the slow test `pytest -m slow tests/core/test_soak.py` runs the "
        "same).  ",
        f"Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"python {platform.python_version()}.  ",
        f"Wall time: {figures['seconds']:.0f} s; final eval_loss {figures['final_eval_loss']:.4f}; checkpoints left: "
        f"{', '.join(figures['checkpoints_left'])}.", "",
        f"RSS (MB) after step 200: {rss[200]:.0f}, after step 1000: {rss[1000]:.0f}, after step 2000: {rss[2000]:.0f} "
        f"(max after warm-up {max(v for k, v in rss.items() if k >= 200):.0f}).  ",
        f"output_dir size (MB) after each save: min {min(disk.values()):.1f}, max {max(disk.values()):.1f} "
        f"(bounded: at most {figures['checkpoints_left'].__len__()} checkpoints are kept).", "",
        "Resuming from each checkpoint left:", "",
        *[f"- {name}: reached step {r['final_step']}, eval_loss {r['eval_loss']:.4f}"
          for name, r in figures["resumed"].items()],
        "", "Raw figures:", "", "```json", json.dumps({k: figures[k] for k in ("rss_mb", "disk_mb")}, indent=0), "```",
    ]
    (Path(__file__).parent / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    sys.exit(main())
