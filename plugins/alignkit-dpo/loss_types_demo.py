"""Each DPO loss type on the built-in demo (builtin:sort): a short run per loss type, its held-out reward accuracy
and margin before and after, wall time and peak RSS; prints the README's markdown table.

    python plugins/alignkit-dpo/loss_types_demo.py [--steps 40]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alignkit_dpo.losses import LOSSES, SMOOTHED

#: settings beyond the loss type (why: the README's notes under the table)
EXTRA = {"sft": ["method.loss_type=[sft,sigmoid]"], "apo_down": ["method.beta=0.5"],
         "discopop": ["method.discopop_tau=1.0"]}


def command(loss_type: str, steps: int, out: Path) -> list[str]:
    extra = EXTRA.get(loss_type, [])
    method = extra if loss_type == "sft" else [f"method.loss_type={loss_type}", *extra]
    return ["-q", "run", "--method", "dpo", *method,
            *(["method.label_smoothing=0.1"] if loss_type in SMOOTHED else []), f"train.max_steps={steps}",
            f"train.eval_steps={steps}", "data.max_eval_samples=64", "train.plots=false",
            f"train.output_dir={out / 'run'}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    exe = Path(sys.executable).parent / "alignkit"
    rows = ["| loss type | held-out accuracy | held-out margin | wall | peak RSS | command |",
            "|---|---|---|---:|---:|---|"]
    for loss_type in LOSSES:
        out = Path(tempfile.mkdtemp(prefix=f"dpo-{loss_type}-"))
        cmd = command(loss_type, args.steps, out)
        start = time.perf_counter()
        with open(out / "stderr.txt", "w") as err:
            proc = subprocess.Popen([str(exe), *cmd], stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # this run's own peak RSS
        wall = time.perf_counter() - start
        if status:
            sys.exit((out / "stderr.txt").read_text()[-2000:])
        rss = usage.ru_maxrss / 1024  # MiB
        lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
        evals = [r for r in map(json.loads, lines) if "eval_loss" in r]
        a, b = evals[0], evals[-1]
        shown = " ".join(c for c in cmd if not c.startswith(("-q", "train.output_dir", "train.plots")))
        rows.append(f"| `{loss_type}` | {a['eval_rewards/accuracies']:.3f} -> {b['eval_rewards/accuracies']:.3f} | "
                    f"{a['eval_rewards/margins']:.3f} -> {b['eval_rewards/margins']:.3f} | {wall:.0f} s | "
                    f"{rss:.0f} MiB | `alignkit {shown}` |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
