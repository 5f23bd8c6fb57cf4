"""The common part of the online methods' side-by-side scripts (grpo_vs_trl.py, rloo_vs_trl.py,
online_dpo_vs_trl.py): the shared start model, step clocks for both libraries, the per-process timing file, the one
held-out evaluator both sides are scored by, and the driver that runs each side in its own process and writes the
results file."""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def start_model(folder: Path, vocab: int | None = None) -> None:
    """The tiny built-in model after the online demos' 150 supervised warm-up steps, saved once for every side.
    `vocab`: its embedding (tied to the LM head) first grown to that many rows, e.g. Qwen's 151,936, so the head and
    its [tokens, vocab] logits weigh as they do on a real model; the warm-up teaches it not to sample the new ids."""
    from alignkit.blocks.demo import sft_warmup
    from alignkit.testing import tiny_model, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_model()
    if vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    sft_warmup(model, tok, 150)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def train_trl(trainer, out: str) -> None:
    """trainer.train() with a step clock, the final model saved to out/final, the timing written."""
    from transformers import TrainerCallback

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(out + "/final")
    report(out, times)


def train_alignkit(method: str, config: dict, out: str) -> None:
    """alignkit.run with a step clock (the first step includes start-up: the scripts report the mean over the steps
    after the first, as for TRL), the timing written."""
    import alignkit

    times = []

    class Clock:
        alignkit_all_runs = True

        @alignkit.hookimpl
        def on_step_end(self, run, step, metrics):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

        @alignkit.hookimpl
        def on_train_start(self, run):
            self.t = time.perf_counter()

    alignkit.run(method, config, plugins=alignkit.get_plugin_manager([Clock()]))
    report(out, times)


def report(out: str, times: list[float]) -> None:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, "timing.json").write_text(json.dumps({"step_seconds": times, "peak_rss_mib": peak_mib}))


def held_out_reward(model_dir: str, reward_names: list[str], max_new: int, functions: dict | None = None) -> float:
    """Mean (summed over `reward_names`) reward of 8 samples for each of 64 test prompts, one fixed seed (the same
    for every side). `functions`: reward name -> function beyond the core's common rewards."""
    from transformers import AutoModelForCausalLM

    from alignkit.blocks.demo import prompt_answer_rows as rows
    from alignkit.config import ModelConfig
    from alignkit.engine.modeling import load_tokenizer
    from alignkit.online.generation import Generator
    from alignkit.online.groups import combine
    from alignkit.online.rewards import RewardRegistry, score

    tok = load_tokenizer(ModelConfig(name_or_path=model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    class Same:
        unwrap_model = staticmethod(lambda m: m)

    test = rows("test")[:64]
    groups = Generator(model, Same(), tok, seed=1234).generate([tok(r["prompt"])["input_ids"] for r in test], n=8,
                                                              max_new_tokens=max_new, temperature=1.0, seed=0)
    registry = RewardRegistry.from_plugins(__import__("alignkit").get_plugin_manager(load_entrypoints=False))
    for name, fn in (functions or {}).items():
        registry.add(name, fn)
    texts = tok.batch_decode([c for g in groups for c in g], skip_special_tokens=True)
    prompts = [r["prompt"] for r in test for _ in range(8)]
    answers = [r["answer"] for r in test for _ in range(8)]
    per_func = score(registry.select(reward_names), prompts, texts, {"answer": answers})
    return float(combine(per_func, [1.0] * len(reward_names)).mean())


def main(script: str, sides: tuple[str, ...], run_side, evaluate, results: str, title: str, description: str) -> int:
    """The command line every side-by-side script shares: with --side, `run_side(side, model, out, steps, seed)` in
    this process; without, `compare` of every side."""
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=1, help="runs of each side (seeds 0..N-1): mean and range")
    parser.add_argument("--vocab", type=int, help="grow the model's vocabulary to this size (e.g. 151936)")
    parser.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args.side, args.model, args.out, args.steps, args.seed)
        return 0
    if args.vocab:
        results = results.replace(".md", f"-vocab{args.vocab}.md")
    compare(script, sides, args.steps, evaluate, results, title, description, args.seeds, args.vocab)
    return 0


def compare(script: str, sides: tuple[str, ...], steps: int, evaluate, results: str, title: str, description: str,
            seeds: int = 1, vocab: int | None = None) -> None:
    """Each side (`script --side NAME --seed S`) trains in its own process from the same start model, once per seed;
    the table of seconds per step (mean over the steps after the first, and over seeds), peak RSS (the highest) and
    held-out reward (`evaluate(model_dir)`: mean and range over seeds) goes to `results` with the machine and its
    load."""
    import torch

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start_model(Path(tmp, "start"), vocab)
        start = evaluate(f"{tmp}/start")
        for side in sides:
            runs = []
            for seed in range(seeds):
                out = f"{tmp}/{side}-{seed}"
                t0 = time.time()
                subprocess.run([sys.executable, script, "--side", side, "--steps", str(steps), "--seed", str(seed),
                                "--model", f"{tmp}/start", "--out", out], check=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
                timing = json.loads(Path(out, "timing.json").read_text())
                after_first = timing["step_seconds"][1:]
                runs.append({"s": sum(after_first) / len(after_first), "rss": timing["peak_rss_mib"],
                             "reward": evaluate(f"{out}/final"), "wall": time.time() - t0})
            rewards = [r["reward"] for r in runs]
            rows.append({"side": side, "s_per_step": sum(r["s"] for r in runs) / seeds,
                         "peak_rss_mib": max(r["rss"] for r in runs), "reward_start": start,
                         "reward_end": sum(rewards) / seeds, "reward_range": (min(rewards), max(rewards)),
                         "wall_s": sum(r["wall"] for r in runs) / seeds})
    after = f"after {steps} steps" + (f" (mean of {seeds} seeds, range)" if seeds > 1 else "")
    header = f"| | s / step | peak RSS (MiB) | held-out reward at start | {after} | process wall (s) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ({r['reward_range'][0]:.3f}-{r['reward_range'][1]:.3f})" if seeds > 1 else ""
        lines.append(f"| {r['side']} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {r['reward_start']:.3f} | "
                     f"{r['reward_end']:.3f}{spread} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    cpu = platform.processor() or platform.machine()
    flags = f" --steps {steps}" + (f" --seeds {seeds}" if seeds > 1 else "") + (f" --vocab {vocab}" if vocab else "")
    model = (f" The model's vocabulary is grown to {vocab:,} rows (embedding tied to the LM head) before the "
             "warm-up, so the head weighs as on a real model." if vocab else "")
    Path(HERE, results).write_text(
        f"# {title} on this CPU\n\n"
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/{Path(script).name}{flags}`\n\n"
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}. Date: {date.today()}. Load average "
        f"(1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after.\n\n"
        + description + model + "\n\n" + table + "\n")
