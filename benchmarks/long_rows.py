"""Peak memory of training on a dataset whose one row holds 50 MB of text.

Formatters encode only the ends of a huge text that truncation can keep (alignkit.blocks.tokens.Encoder), so memory does
not grow with the row (before: 21 GB for this row, killed). Writes the two datasets, then measures the peak RSS of

1. `alignkit run --method orpo data.train=orpo-50mb.jsonl ...` (50 MB prompt, the preference formatter), and
2. `alignkit run --method sft data.train=lm-50mb.jsonl ...` (50 MB `text`, the core's language-modeling rows;
   needs plugins/alignkit-sft installed, as the README's set-up does),

each under `/usr/bin/time -v`, and prints a Markdown table for benchmarks/long-rows.md.

    python benchmarks/long_rows.py [--mb 50] [--dir /tmp/alignkit-long-rows]
"""

import argparse
import json
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

STEPS = ["train.max_steps=2", "train.per_device_train_batch_size=2", "train.save_steps=null", "train.eval_steps=null",
         "train.plots=false", "data.eval_fraction=null"]


def big_text(chars: int) -> str:
    rng = random.Random(0)
    vocab = ["sort:", "1", "22", "333", "the", "sky", "is", "blue.", "hello", "\n", "="]
    parts, n = [], 0
    while n < chars:
        parts.append(rng.choice(vocab))
        n += len(parts[-1]) + 1
    return " ".join(parts)[:chars]


def write(folder: Path, mb: int) -> tuple[Path, Path]:
    big = big_text(mb * 1_000_000)
    orpo, lm = folder / f"orpo-{mb}mb.jsonl", folder / f"lm-{mb}mb.jsonl"
    with orpo.open("w") as f:
        f.write(json.dumps({"prompt": big, "chosen": " 1 2", "rejected": " 2 1"}) + "\n")
        f.writelines(json.dumps({"prompt": f"sort: {i} 1 =", "chosen": f" 1 {i}", "rejected": f" {i} 1"}) + "\n"
                     for i in range(3))
    with lm.open("w") as f:
        f.write(json.dumps({"text": big}) + "\n")
        f.writelines(json.dumps({"text": f"sort: {i} 1 = 1 {i}"}) + "\n" for i in range(3))
    return orpo, lm


def peak_rss_mb(command: list[str], env: dict) -> tuple[float, float, str]:
    start = time.time()
    out = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return kb / 1024, time.time() - start, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--dir", default="/tmp/alignkit-long-rows")
    args = parser.parse_args()
    import os

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    orpo, lm = write(folder, args.mb)
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "cache"), "HF_HUB_OFFLINE": "1"}
    runs = {
        "orpo": ["alignkit", "run", "--method", "orpo", f"data.train={orpo}", f"train.output_dir={folder / 'out-orpo'}",
                 *STEPS],
        "sft (language-modeling)": ["alignkit", "run", "--method", "sft", f"data.train={lm}",
                                    f"train.output_dir={folder / 'out-sft'}", *STEPS],
    }
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}\n")
    print("| formatter | one row of | peak RSS | wall | command |\n|---|---|---|---|---|")
    for name, command in runs.items():
        rss, wall, _ = peak_rss_mb(command, env)
        shown = " ".join(command).replace(str(folder), args.dir)
        print(f"| {name} | {args.mb} MB | {rss:.0f} MB | {wall:.0f} s | `/usr/bin/time -v {shown}` |")


if __name__ == "__main__":
    main()
