"""RLOO side by side: alignkit and TRL 1.16's RLOOTrainer on the same tiny model, prompts and rewards, on this CPU.

Both start from the same briefly supervised tiny model (the RLOO demo's warm-up, saved once), train N steps
on the same sorting prompts (16 prompts x 8 completions per step, up to 14 new tokens, temperature 1,
beta 0.05 (TRL's default: the KL in the reward, a frozen reference), lr 3e-4 linear decay, no dropout) with the
same reward (exact-match), each in its own process. Reported: seconds per optimizer step (mean over the steps after
the first), peak resident memory of the process (ru_maxrss), and the held-out reward of the final model, scored by
one shared evaluator (64 test prompts x 8 samples, fixed seed) so both are measured the same way.

    pip install -e ".[bench]" -e plugins/alignkit-rloo
    OMP_NUM_THREADS=1 python benchmarks/rloo_vs_trl.py --steps 30          # writes benchmarks/rloo-vs-trl.md
"""

import sys

import online_bench
from online_bench import train_alignkit, train_trl

PROMPTS, GENERATIONS, MAX_NEW, LR = 16, 8, 14, 3e-4
REWARDS = ["exact-match"]
BETA = 0.05


def run_trl(model_dir: str, out: str, steps: int, seed: int = 0) -> None:
    from trl import RLOOConfig, RLOOTrainer

    from alignkit.blocks.demo import load_sort_prompts as load

    args = RLOOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                      max_completion_length=MAX_NEW, temperature=1.0, learning_rate=LR, lr_scheduler_type="linear",
                      max_steps=steps, beta=BETA, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                      logging_steps=1, disable_tqdm=True, seed=seed, disable_dropout=True, gradient_checkpointing=False)
    from alignkit.online import exact_match

    funcs = [exact_match]
    trainer = RLOOTrainer(model=model_dir, reward_funcs=funcs, args=args, train_dataset=load("train"))
    train_trl(trainer, out)


def run_alignkit(model_dir: str, out: str, steps: int, seed: int = 0) -> None:
    train_alignkit("rloo", {
        "model": {"name_or_path": model_dir},
        "data": {"train": "builtin:sort-prompts"},
        "method": {"num_generations": GENERATIONS, "max_completion_length": MAX_NEW, "temperature": 1.0,
                   "beta": BETA, "reward_funcs": REWARDS, "sft_warmup_steps": 0},
        "train": {"output_dir": out + "/final", "per_device_train_batch_size": PROMPTS, "learning_rate": LR,
                  "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "max_steps": steps, "logging_steps": 1,
                  "save_steps": None, "eval_steps": None, "eval_on_start": False, "disable_tqdm": True,
                  "plots": False, "seed": seed, "max_grad_norm": 1.0},
    }, out)


def held_out_reward(model_dir: str) -> float:
    return online_bench.held_out_reward(model_dir, REWARDS, MAX_NEW, None)


def run_side(side: str, model_dir: str, out: str, steps: int, seed: int) -> None:
    (run_trl if side == "trl" else run_alignkit)(model_dir, out, steps, seed)


def main() -> int:
    return online_bench.main(__file__, ("alignkit", "trl"), run_side, held_out_reward, "rloo-vs-trl.md",
                             f"RLOO: alignkit vs TRL {__import__('trl').__version__} RLOOTrainer",
                             __doc__.split("\n\n")[1].replace("\n", " "))


if __name__ == "__main__":
    sys.exit(main())
