"""Online DPO side by side: alignkit and TRL 1.16's OnlineDPOTrainer on the same tiny model, prompts and rewards, on
this CPU.

Both start from the same briefly supervised tiny model (the online demos' warm-up, saved once), train N steps
on the same sorting prompts (64 prompts x 2 completions per step, up to 14 new tokens, temperature 1, beta 0.1,
sigmoid loss against a frozen copy of the start, lr 3e-4 linear decay, no dropout) with the same reward
(exact-match), each in its own process. Reported: seconds per optimizer step (mean over the steps after
the first), peak resident memory of the process (ru_maxrss), and the held-out reward of the final model, scored by
one shared evaluator (64 test prompts x 8 samples, fixed seed) so both are measured the same way.

    pip install -e ".[bench]" -e plugins/alignkit-dpo
    OMP_NUM_THREADS=1 python benchmarks/online_dpo_vs_trl.py --steps 30    # writes benchmarks/online-dpo-vs-trl.md
"""

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

import torch

HERE = Path(__file__).resolve().parent
PROMPTS, GENERATIONS, MAX_NEW, LR = 64, 2, 14, 3e-4
REWARDS = ["exact-match"]
BETA = 0.1


def start_model(folder: Path) -> None:
    from alignkit.blocks.demo import sft_warmup
    from alignkit.testing import tiny_model, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_model()
    sft_warmup(model, tok, 150)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def run_trl(model_dir: str, out: str, steps: int) -> None:
    import warnings

    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from alignkit.blocks.demo import load_sort_prompts as load
    from alignkit.online import exact_match

    warnings.simplefilter("ignore")
    args = OnlineDPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS, max_new_tokens=MAX_NEW,
                           temperature=1.0, learning_rate=LR, lr_scheduler_type="linear", max_steps=steps,
                           beta=[BETA], bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                           disable_tqdm=True, seed=0, disable_dropout=True, gradient_checkpointing=False)
    trainer = OnlineDPOTrainer(model=model_dir, reward_funcs=[exact_match], args=args, train_dataset=load("train"),
                               processing_class=__import__("transformers").AutoTokenizer.from_pretrained(model_dir))
    times = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(out + "/final")
    report(out, times)


def run_alignkit(model_dir: str, out: str, steps: int) -> None:
    import alignkit

    times = []

    class Clock:
        @alignkit.hookimpl
        def on_step_end(self, run, step, metrics):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

        @alignkit.hookimpl
        def on_train_start(self, run):
            self.t = time.perf_counter()

    clock = Clock()
    clock.alignkit_all_runs = True
    alignkit.run("online-dpo", {
        "model": {"name_or_path": model_dir},
        "data": {"train": "builtin:sort-prompts"},
        "method": {"max_new_tokens": MAX_NEW, "temperature": 1.0, "beta": BETA, "reward_funcs": REWARDS,
                   "sft_warmup_steps": 0},
        "train": {"output_dir": out + "/final", "per_device_train_batch_size": PROMPTS, "learning_rate": LR,
                  "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "max_steps": steps, "logging_steps": 1,
                  "save_steps": None, "eval_steps": None, "eval_on_start": False, "disable_tqdm": True,
                  "plots": False, "seed": 0, "max_grad_norm": 1.0},
    }, plugins=alignkit.get_plugin_manager([clock]))
    # the step clock includes the first step's start-up; report as TRL's (mean over steps after the first)
    report(out, times)


def report(out: str, times: list[float]) -> None:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, "timing.json").write_text(json.dumps({"step_seconds": times, "peak_rss_mib": peak_mib}))


def held_out_reward(model_dir: str) -> float:
    """Mean reward of 8 samples for each of 64 test prompts, one fixed seed (the same for both)."""
    from transformers import AutoModelForCausalLM

    from alignkit.blocks.demo import prompt_answer_rows as rows
    from alignkit.config import ModelConfig
    from alignkit.engine.modeling import load_tokenizer
    from alignkit.online import exact_match
    from alignkit.online.generation import Generator
    from alignkit.online.groups import combine
    from alignkit.online.rewards import RewardRegistry, score

    tok = load_tokenizer(ModelConfig(name_or_path=model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    class Same:
        unwrap_model = staticmethod(lambda m: m)

    test = rows("test")[:64]
    groups = Generator(model, Same(), tok, seed=1234).generate([tok(r["prompt"])["input_ids"] for r in test], n=8,
                                                              max_new_tokens=MAX_NEW, temperature=1.0, seed=0)
    registry = RewardRegistry()
    registry.add("exact-match", exact_match)
    texts = tok.batch_decode([c for g in groups for c in g], skip_special_tokens=True)
    prompts = [r["prompt"] for r in test for _ in range(8)]
    answers = [r["answer"] for r in test for _ in range(8)]
    return float(combine(score(registry.select(REWARDS), prompts, texts, {"answer": answers}), [1.0]).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        (run_trl if args.side == "trl" else run_alignkit)(args.model, args.out, args.steps)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start_model(Path(tmp, "start"))
        start = held_out_reward(f"{tmp}/start")
        for side in ("alignkit", "trl"):
            out = f"{tmp}/{side}"
            t0 = time.time()
            subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--model",
                            f"{tmp}/start", "--out", out], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            timing = json.loads(Path(out, "timing.json").read_text())
            steps = timing["step_seconds"][1:]
            rows.append({"side": side, "s_per_step": sum(steps) / len(steps), "peak_rss_mib": timing["peak_rss_mib"],
                         "reward_start": start, "reward_end": held_out_reward(f"{out}/final"),
                         "wall_s": time.time() - t0})
    header = f"| | s / step | peak RSS (MiB) | held-out reward at start | after {args.steps} steps | process wall (s) |"
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [f"| {r['side']} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {r['reward_start']:.3f} | "
              f"{r['reward_end']:.3f} | {r['wall_s']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    cpu = platform.processor() or platform.machine()
    (HERE / "online-dpo-vs-trl.md").write_text(
        f"# Online DPO: alignkit vs TRL {__import__('trl').__version__} OnlineDPOTrainer on this CPU\n\n"
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/online_dpo_vs_trl.py --steps {args.steps}`\n\n"
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}. Date: {date.today()}.\n\n"
        + __doc__.split("\n\n")[1].replace("\n", " ") + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
