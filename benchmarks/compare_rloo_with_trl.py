"""alignkit's RLOO against TRL 1.16's RLOOTrainer, on the same fixed completions: rewards, KL, advantages, metrics,
loss and one step's gradients.

TRL runs its own `_generate_and_score_completions` (its `_generate_single_turn` is replaced by one returning fixed
completions: sampling differs by design) and its `_compute_loss`; alignkit runs its rollout stage (`RLOORollout`,
then the step-wide `finish`, with a stand-in generation handle returning the same completions and scoring with the
same policy and reference) and `RLOOLoss` normalised by its counts, as the engine does. Both sides load the same
tiny model; the policy is moved away from the reference before the rollout (so the KL in the reward is not zero)
and, with num_iterations 2, again after it (so the sequence ratio and its clipping are active). Two reward
functions with weights, one returning None for a whole prompt; rows of different lengths, one cut at
max_completion_length with no EOS. Standard and conversational prompts. "eval loss" is each side's loss under
no_grad in eval mode on its own batch (alignkit's plain path; TRL's prediction_step computes the same).

    pip install -e ".[bench]" -e plugins/alignkit-rloo
    python benchmarks/compare_rloo_with_trl.py            # prints a table; exit 1 on any mismatch
"""

import argparse
import contextlib
import copy
import json
import sys
import tempfile

import torch
from alignkit_rloo.config import RLOOConfig
from alignkit_rloo.loss import RLOOLoss, rollout_metrics
from alignkit_rloo.rollout import RLOORollout
from datasets import Dataset

from alignkit.formatters import PromptOnlyFormatter
from alignkit.online import RewardRegistry
from alignkit.testing import tiny_model, tiny_tokenizer

TOL = 1e-5
N_GEN, MAX_NEW = 4, 7
TEXTS = ["sort: 3 1 2 =", "sort: 9 8 7 6 5 =", "sort: 4 4 1 ="]
ANSWERS = ["x", "skip", "y"]
METRICS = ("reward", "reward_std", "rewards/reward_a/mean", "rewards/reward_b/mean", "frac_reward_zero_std", "kl",
           "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/low_mean",
           "clip_ratio/high_mean", "clip_ratio/region_mean")


def _text(c):
    return c if isinstance(c, str) else c[-1]["content"]  # TRL hands conversational completions as messages


def reward_a(prompts, completions, **kw):
    """Varies within groups: completion length in characters, mod 5."""
    return [float(len(_text(c)) % 5) for c in completions]


def reward_b(prompts, completions, answer=None, **kw):
    """None for rows whose answer is "skip"; else 1.0 for an even number of characters."""
    return [None if a == "skip" else float(len(_text(c)) % 2 == 0) for c, a in zip(completions, answer)]


def completions(tok, seed: int = 0) -> list[list[int]]:
    """N_GEN completions per prompt, different lengths, each ending in EOS but row 1 (cut at MAX_NEW)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(len(TEXTS) * N_GEN):
        n = MAX_NEW if r == 1 else int(torch.randint(2, MAX_NEW + 1, (1,), generator=g))
        ids = torch.randint(4, len(tok), (n,), generator=g).tolist()
        rows.append(ids if r == 1 else ids[:-1] + [tok.eos_token_id])
    return rows


def perturb(model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def run_case(path: str, tok, tmp: str, case: dict) -> dict:
    from trl import RLOOConfig as TRLConfig
    from trl import RLOOTrainer

    cfg = RLOOConfig(num_generations=N_GEN, max_completion_length=MAX_NEW, temperature=0.7, epsilon=0.2,
                     epsilon_high=0.28, reward_funcs=["reward_a", "reward_b"], reward_weights=[1.0, 0.5],
                     beta=case["beta"], num_iterations=case["iterations"],
                     normalize_advantages=case.get("normalize", False),
                     reward_clip_range=case.get("clip"), mask_truncated_completions=case.get("mask_truncated", False))
    chat = case.get("chat", False)
    prompts = [[{"role": "user", "content": t}] for t in TEXTS] if chat else TEXTS
    fixed = completions(tok)
    args = TRLConfig(output_dir=tmp, beta=cfg.beta, num_iterations=cfg.num_iterations, epsilon=cfg.epsilon,
                     epsilon_high=cfg.epsilon_high, temperature=cfg.temperature, num_generations=N_GEN,
                     max_completion_length=MAX_NEW, reward_weights=cfg.reward_weights,
                     normalize_advantages=cfg.normalize_advantages, reward_clip_range=cfg.reward_clip_range,
                     mask_truncated_completions=cfg.mask_truncated_completions,
                     per_device_train_batch_size=len(TEXTS) * N_GEN, report_to=[], use_cpu=True, bf16=False,
                     logging_steps=1, gradient_checkpointing=False)
    trainer = RLOOTrainer(model=path, reward_funcs=[reward_a, reward_b], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": prompts[0], "answer": "x"}] * 8))
    trainer.current_gradient_accumulation_steps = 1
    trainer._generate_single_turn = lambda prompt_ids, images, fields: fixed
    policy = trainer.model
    ours = tiny_model()
    ours.load_state_dict(policy.state_dict())
    reference = copy.deepcopy(ours).eval()
    for m in (policy, ours):
        perturb(m, 0.02, seed=1)  # the policy has moved away from the reference before this rollout
        m.train()

    # ---- TRL: its scoring of the fixed completions ----
    rows = [{"prompt": prompts[i // N_GEN], "answer": ANSWERS[i // N_GEN]} for i in range(len(TEXTS) * N_GEN)]
    theirs = trainer._generate_and_score_completions(rows)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}

    # ---- alignkit: the rollout stage on the same completions ----
    registry = RewardRegistry()
    registry.add("reward_a", reward_a)
    registry.add("reward_b", reward_b)
    rollout = RLOORollout(cfg, tok, rewards=registry)

    class Handle:
        def generate(self, prompt_ids, n, **kw):
            return [fixed[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

        def scoring(self, name="policy"):
            return contextlib.nullcontext(ours if name == "policy" else reference)

    class Ctx:
        generator, training, step, device = Handle(), True, 0, torch.device("cpu")

        @staticmethod
        def reduce(t, op="sum"):
            return t

    formatter = PromptOnlyFormatter(PromptOnlyFormatter.config_class(name="rloo"), tok)
    ids = [formatter.prompt_ids(p) for p in prompts]
    width = max(map(len, ids))
    batch = {"prompt_input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids]),
             "prompt_attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
             "prompt": prompts, "answer": ANSWERS}
    with torch.no_grad():
        mine = rollout.finish([rollout(batch, ctx=Ctx)], ctx=Ctx)[0]
    adv_diff = float((mine["advantages"] - theirs["advantages"]).abs().max())
    prompt_diff = int((mine["prompt_ids"] != theirs["prompt_ids"]).sum())

    if cfg.num_iterations > 1:  # one optimisation pass happened since the rollout
        for m in (policy, ours):
            perturb(m, 0.03, seed=2)

    loss_fn = RLOOLoss(cfg)
    loss_fn.prepare_model(ours)
    trl_loss = trainer._compute_loss(policy, theirs)
    trl_loss.backward()
    trl_metrics.update({k: v[-1] for k, v in trainer._metrics["train"].items() if v})
    out = loss_fn(ours, mine)
    counts = {u: float(c) for u, c in loss_fn.counts(mine).items()}
    our_loss = out.normalized(counts)
    our_loss.backward()
    theirs_params = dict(policy.named_parameters())
    grad_worst = max(float((p.grad - theirs_params[n].grad).abs().max()
                           / theirs_params[n].grad.abs().max().clamp(min=1e-12)) for n, p in ours.named_parameters())
    metrics = {**{k: float(s) / float(c) for k, (s, c) in rollout_metrics(mine).items()},
               **{k: float(s) / max(float(c), 1.0) for k, (s, c) in out.metrics.items()}}
    compared = {k: (metrics[k], trl_metrics[k]) for k in METRICS if k in metrics and k in trl_metrics}
    metric_worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in compared.values())

    # ---- eval: each side's loss under no_grad in eval mode ----
    policy.eval()
    ours.eval()
    with torch.no_grad():
        trl_eval = trainer._compute_loss(policy, theirs).item()
        our_eval = loss_fn(ours, mine).normalized(counts).item()
    scale = max(abs(trl_loss.item()), 1e-3)  # on-policy (one pass) the loss is minus the mean advantage
    return {**{k: case.get(k, False) for k in ("chat", "beta", "iterations", "normalize", "clip", "mask_truncated")},
            "prompt_ids_differ": prompt_diff, "advantage_abs_max": adv_diff, "metrics_rel_max": metric_worst,
            "metrics_compared": sorted(compared), "alignkit_loss": our_loss.item(), "trl_loss": trl_loss.item(),
            "loss_rel": abs(our_loss.item() - trl_loss.item()) / scale,
            "eval_loss_rel": abs(our_eval - trl_eval) / max(abs(trl_eval), 1e-3), "grad_rel_max": grad_worst}


CASES = {
    "beta0": {"beta": 0.0, "iterations": 1},
    "kl-in-reward": {"beta": 0.05, "iterations": 1},
    "kl-iterations2": {"beta": 0.05, "iterations": 2},
    "normalize-clip": {"beta": 0.05, "iterations": 2, "normalize": True, "clip": (0.0, 3.0)},
    "mask-truncated": {"beta": 0.05, "iterations": 2, "mask_truncated": True},
    "chat-kl-iterations2": {"beta": 0.05, "iterations": 2, "chat": True},
    "chat-beta0": {"beta": 0.0, "iterations": 1, "chat": True},
}


def compare(names=None) -> list[dict]:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model().save_pretrained(f"{tmp}/model")
        tok.save_pretrained(f"{tmp}/model")
        for name in names or CASES:
            out.append({"case": name, **run_case(f"{tmp}/model", tok, f"{tmp}/trl-{name}", CASES[name])})
    return out


def worst(row: dict) -> float:
    return max(row["advantage_abs_max"], row["metrics_rel_max"], row["loss_rel"], row["eval_loss_rel"],
               row["grad_rel_max"], float(row["prompt_ids_differ"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = compare()
    print(f"{'case':20} {'alignkit loss':>14} {'TRL loss':>14} {'loss rel':>9} {'eval rel':>9} {'grad rel':>9} "
          f"{'adv abs':>9} {'metric rel':>10}")
    for r in rows:
        print(f"{r['case']:20} {r['alignkit_loss']:14.8f} {r['trl_loss']:14.8f} {r['loss_rel']:9.1e} "
              f"{r['eval_loss_rel']:9.1e} {r['grad_rel_max']:9.1e} {r['advantage_abs_max']:9.1e} "
              f"{r['metrics_rel_max']:10.1e}")
    print("metrics compared:", ", ".join(rows[0]["metrics_compared"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if worst(r) > TOL]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases within {TOL:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
