"""Peak RSS and step time of a training step's forward + backward on the CPU, with glibc's default allocator policy
and with alignkit's `train.release_host_memory` (alignkit.engine.hostmemory: tensors of THRESHOLD and more mapped
on their own, so what a step frees leaves the process).

    OMP_NUM_THREADS=1 python benchmarks/host_memory.py          # -> benchmarks/host-memory.md

Each setting runs in its own process: a random Qwen2 at Qwen2-0.5B's width (hidden 896, 14 heads, 2 key-value
heads, MLP 4,864) with `--layers` layers and a small vocabulary, gradient checkpointing on, one row of `--tokens`
tokens (the GRPO memory job's 8 completions of 512 tokens after their prompt, shared), `--steps` forward + backward
passes with AdamW steps between them. Reported: the process's peak RSS (ru_maxrss) and the median step time.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

WORKER = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, Qwen2Config
from alignkit.engine import hostmemory
layers, tokens, steps, setting = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if setting != "glibc default":
    assert hostmemory.mmap_large_tensors(int(setting))
torch.manual_seed(0)
config = Qwen2Config(vocab_size=1000, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
ids = torch.randint(0, 1000, (1, tokens))
times = []
for _ in range(steps):
    start = time.perf_counter()
    model.model(input_ids=ids, use_cache=False).last_hidden_state.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "times": times}))
"""


def main() -> None:
    from orpo_speed import machine

    from alignkit.engine.hostmemory import THRESHOLD

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4400)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--thresholds-mb", type=float, nargs="*", default=[THRESHOLD / 2**20],
                   help="mmap thresholds to run beside glibc's default (default: alignkit's)")
    p.add_argument("--note", default="", help="a line about the machine's load")
    p.add_argument("--output", default=str(HERE / "host-memory.md"))
    args = p.parse_args()
    rows = []
    for setting in ["glibc default", *(str(int(mb * 2**20)) for mb in args.thresholds_mb)]:
        out = subprocess.run([sys.executable, "-c", WORKER, str(args.layers), str(args.tokens), str(args.steps),
                              setting], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        name = setting if setting == "glibc default" else f"mmap threshold {int(setting) / 2**20:g} MiB"
        rows.append(f"| {name} | {result['peak_mb']:.0f} | {statistics.median(result['times'][1:]):.2f} |")
        print(rows[-1], flush=True)
    lines = ["# Host memory: glibc's heaps against tensors mapped on their own", "",
             "- command: `OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " "
             + " ".join(["python", "benchmarks/host_memory.py", *sys.argv[1:]]) + "`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine('cpu')}" + (f"; {args.note}" if args.note else ""),
             f"- Qwen2-0.5B's width, {args.layers} layers, one row of {args.tokens} tokens, gradient checkpointing, "
             f"fused AdamW; {args.steps} steps, the median of all but the first", "",
             "| allocator | peak RSS MB | s/step |", "|---|---|---|", *rows, ""]
    Path(args.output).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
