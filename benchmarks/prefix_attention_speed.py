"""Attention forward + backward of a prefix-shared row: the whole [L, L] mask against the split layout
(alignkit.blocks.prefix_attention: the first part causal, only the second part under its mask).

    OMP_NUM_THREADS=1 python benchmarks/prefix_attention_speed.py        # -> benchmarks/prefix-attention.md

Shapes: the reward rows of methods_vs_trl.py (2 multi-turn pairs of the `small` Qwen2: 4 heads, 2 key-value heads,
head size 32), one shared row per pair: the first part T (the padded width), the second part L - T (the rejected
answers past the shortest common prefix): (T, L - T) = (507, 177) at seq 512 and (1738, 356) at seq 2,048. Both paths
run transformers' own sdpa_attention_forward on the same tensors, so the difference is the mask and the kernel.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

SHAPES = {"seq 512": (507, 177), "seq 2048": (1738, 356)}


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    from orpo_speed import machine
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from alignkit.blocks.prefix_attention import prefix_attention_forward

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--note", default="", help="a line about the machine's load")
    p.add_argument("--output", default=str(Path(__file__).with_name("prefix-attention.md")))
    args = p.parse_args()
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    rows = []
    for name, (first, second) in SHAPES.items():
        length, pairs = first + second, 2
        g = torch.Generator().manual_seed(0)
        q = torch.randn(pairs, 4, length, 32, generator=g, requires_grad=True)
        k, v = (torch.randn(pairs, 2, length, 32, generator=g, requires_grad=True) for _ in range(2))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        whole = torch.zeros(pairs, 1, length, length).masked_fill(~causal, torch.finfo(torch.float32).min)
        split = whole[:, :, first:].contiguous()

        def run(forward, mask, q=q, k=k, v=v):
            out, _ = forward(module, q, k, v, mask, scaling=32 ** -0.5)
            out.sum().backward()

        full_s = timed(lambda mask=whole: run(sdpa_attention_forward, mask), args.repeats)
        split_s = timed(lambda mask=split: run(prefix_attention_forward, mask), args.repeats)
        rows.append(f"| {name} | {first} + {second} | {full_s * 1e3:.1f} | {split_s * 1e3:.1f} | "
                    f"{split_s / full_s:.2f} | {whole.numel() * 4 / 2**20:.1f} | {split.numel() * 4 / 2**20:.1f} |")
        print(rows[-1], flush=True)
    lines = ["# Split prefix attention: one layer's attention, forward + backward", "",
             f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
             + " ".join(["python", "benchmarks/prefix_attention_speed.py", *sys.argv[1:]]) + "`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine('cpu')}; torch {torch.__version__}" + (f"; {args.note}" if args.note else ""),
             f"- {args.repeats} repeats after one warm-up; [2 pairs, 4 heads (2 key-value), L, 32], float32", "",
             "| rows | T + (L - T) | ms whole mask | ms split | ratio | mask MB whole | mask MB split |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    Path(args.output).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
