"""GRPO side by side: alignkit and TRL 1.16's GRPOTrainer on the same tiny model, prompts and rewards, on this CPU.

Both start from the same briefly supervised tiny model (the GRPO demo's warm-up, saved once), train N steps
on the same sorting prompts (16 prompts x 8 completions per step, up to 14 new tokens, temperature 1,
dapo loss, beta 0, lr 3e-4 linear decay, no dropout) with the same rewards (sort-order + exact-match),
each in its own process. Reported: seconds per optimizer step (mean over the steps after the first),
peak resident memory of the process (ru_maxrss), and the held-out reward of the final model, scored by
one shared evaluator (64 test prompts x 8 samples, fixed seed) so both are measured the same way.
"alignkit-async" is alignkit with method.max_staleness=1: the next step's completions are sampled in a worker thread
while the current step trains (with OMP_NUM_THREADS=1, on a second core).

    pip install -e ".[bench]" -e plugins/alignkit-grpo
    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py --steps 30          # writes benchmarks/grpo-vs-trl.md
"""

import sys

import online_bench
from online_bench import train_alignkit, train_trl

PROMPTS, GENERATIONS, MAX_NEW, LR = 16, 8, 14, 3e-4
REWARDS = ["sort-order", "exact-match"]
#: alignkit synchronous, alignkit with async rollouts (method.max_staleness=1), TRL
SIDES = ("alignkit", "alignkit-async", "trl")


def run_trl(model_dir: str, out: str, steps: int, seed: int = 0) -> None:
    from alignkit_grpo.rewards import BUILTIN
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.blocks.demo import load_sort_prompts as load

    args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                      max_completion_length=MAX_NEW, temperature=1.0, learning_rate=LR, lr_scheduler_type="linear",
                      max_steps=steps, loss_type="dapo", beta=0.0, bf16=False, use_cpu=True, report_to=[],
                      save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed,
                      gradient_checkpointing=False, disable_dropout=True)  # TRL's default is checkpointing on
    funcs = [BUILTIN[name] for name in REWARDS]
    for f, name in zip(funcs, REWARDS):
        f.__name__ = name
    trainer = GRPOTrainer(model=model_dir, reward_funcs=funcs, args=args, train_dataset=load("train"))
    train_trl(trainer, out)


def run_alignkit(model_dir: str, out: str, steps: int, seed: int = 0, max_staleness: int = 0) -> None:
    train_alignkit("grpo", {
        "model": {"name_or_path": model_dir},
        "data": {"train": "builtin:sort-prompts"},
        "method": {"num_generations": GENERATIONS, "max_completion_length": MAX_NEW, "temperature": 1.0,
                   "loss_type": "dapo", "beta": 0.0, "reward_funcs": REWARDS, "sft_warmup_steps": 0,
                   "max_staleness": max_staleness},
        "train": {"output_dir": out + "/final", "per_device_train_batch_size": PROMPTS, "learning_rate": LR,
                  "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "max_steps": steps, "logging_steps": 1,
                  "save_steps": None, "eval_steps": None, "eval_on_start": False, "disable_tqdm": True,
                  "plots": False, "seed": seed, "max_grad_norm": 1.0},
    }, out)


def held_out_reward(model_dir: str) -> float:
    from alignkit_grpo.rewards import DEMO  # sort-order (exact-match is the core's)

    return online_bench.held_out_reward(model_dir, REWARDS, MAX_NEW, DEMO)


def run_side(side: str, model_dir: str, out: str, steps: int, seed: int) -> None:
    if side == "trl":
        run_trl(model_dir, out, steps, seed)
    else:
        run_alignkit(model_dir, out, steps, seed, max_staleness=int(side == "alignkit-async"))


def main() -> int:
    return online_bench.main(__file__, SIDES, run_side, held_out_reward, "grpo-vs-trl.md",
                             f"GRPO: alignkit vs TRL {__import__('trl').__version__} GRPOTrainer",
                             __doc__.split("\n\n")[1].replace("\n", " "))


if __name__ == "__main__":
    sys.exit(main())
