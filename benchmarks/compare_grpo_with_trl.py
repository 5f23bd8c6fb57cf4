"""alignkit's GRPO loss and gradients against TRL's GRPOTrainer loss computation, on the same inputs.

Both sides get the same tiny model (saved to a folder and loaded by each), the same prompts, sampled
completions (with padding and a truncated row), advantages (alignkit_grpo.advantages from the same
rewards), old log-probs (num_iterations 2) and frozen reference (beta > 0). TRL runs its own
`GRPOTrainer._compute_loss` on the inputs dict it builds in `_generate_and_score_completions`; alignkit
runs `GRPOLoss` normalised by its counts, as the engine does. The policy is moved away from the
reference (and from the old policy) so the ratio, clipping and KL terms are all active.

A second table runs TRL's own scoring: a `rollout_func` hands TRL fixed completions, TRL's
`_generate_and_score_completions` computes rewards (two reward functions with weights, one returning None
for a prompt), advantages (scale_rewards group / batch / none) and its reward metrics; alignkit's
rollout stage (GRPORollout + finish) does the same from the same completions; then each side's loss and
gradients on its own batch.

    pip install -e ".[bench]" -e plugins/alignkit-grpo
    python benchmarks/compare_grpo_with_trl.py            # prints a table; exit 1 on any mismatch
"""

import argparse
import copy
import itertools
import json
import sys
import tempfile

import torch
from alignkit_grpo.advantages import advantages
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.loss import GRPOLoss
from datasets import Dataset

from alignkit.online.completions import completion_logps
from alignkit.online.groups import combine
from alignkit.testing import tiny_model, tiny_tokenizer

TOL = 1e-5
#: the objective's settings, named alike on both sides (handed from alignkit's config to TRL's)
OBJECTIVE = ("loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "sapo_temperature_pos",
             "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
             "top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef")
#: adaptive entropy control's settings (alignkit's defaults are TRL's; always handed over)
ADAPTIVE = ("use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target")
#: TRL's metrics of the objective compared (where both sides log them)
METRICS = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss", "entropy_coef")
N_PROMPTS, N_GEN, MAX_NEW = 3, 4, 7


def inputs(tok, seed: int = 0) -> dict:
    """Left-padded prompts, right-padded completions (one row cut at MAX_NEW: no EOS), rewards [N, 2]."""
    g = torch.Generator().manual_seed(seed)
    texts = ["sort: 3 1 2 =", "sort: 9 8 7 6 5 =", "sort: 4 4 1 ="]
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    prompt = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    prompt_mask = (torch.arange(width)[None] >= torch.tensor([width - len(i) for i in ids])[:, None]).long()
    prompt, prompt_mask = prompt.repeat_interleave(N_GEN, 0), prompt_mask.repeat_interleave(N_GEN, 0)
    rows = N_PROMPTS * N_GEN
    lengths = torch.randint(2, MAX_NEW + 1, (rows,), generator=g)
    lengths[1] = MAX_NEW  # truncated (no EOS)
    completion = torch.randint(4, len(tok), (rows, MAX_NEW), generator=g)
    mask = (torch.arange(MAX_NEW)[None] < lengths[:, None]).long()
    for r in range(rows):
        if r != 1:
            completion[r, lengths[r] - 1] = tok.eos_token_id
    completion = completion.masked_fill(mask == 0, tok.pad_token_id)
    rewards = torch.rand(rows, 2, generator=g)
    rewards[2, 1] = float("nan")  # the second reward function does not apply to row 2
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
            "completion_mask": mask, "rewards_NF": rewards, "truncated": torch.arange(rows) == 1}


def perturb(model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def trl_trainer(path: str, tok, cfg: GRPOConfig, out: str):
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    knobs = {k: getattr(cfg, k) for k in OBJECTIVE + ADAPTIVE}
    args = TRLConfig(output_dir=out, **knobs, beta=cfg.beta, temperature=cfg.temperature, num_generations=N_GEN,
                     max_completion_length=MAX_NEW, num_iterations=cfg.num_iterations, scale_rewards=cfg.scale_rewards,
                     per_device_train_batch_size=N_GEN, report_to=[], use_cpu=True, logging_steps=1, bf16=False,
                     mask_truncated_completions=cfg.mask_truncated_completions,
                     use_bias_correction_kl=cfg.use_bias_correction_kl)
    data = Dataset.from_list([{"prompt": "sort: 1 2 ="}] * 8)
    trainer = GRPOTrainer(model=path, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=args, train_dataset=data, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def compare(cfg: GRPOConfig, path: str, tok, tmp: str) -> dict:
    x = inputs(tok)
    batch = {k: x[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    if cfg.mask_truncated_completions:
        batch["completion_mask"] = batch["completion_mask"] * (~x["truncated"])[:, None].long()
    adv, _ = advantages(combine(x["rewards_NF"], [1.0, 0.5]), N_GEN, cfg.scale_rewards)
    batch["advantages"] = adv

    trainer = trl_trainer(path, tok, cfg, tmp)
    policy = trainer.model
    ours = tiny_model()
    ours.load_state_dict(policy.state_dict())  # the reference: both sides loaded it from `path`
    reference = copy.deepcopy(ours).eval()
    old_model = copy.deepcopy(ours)
    perturb(old_model, 0.02, seed=1)
    for m in (policy, ours):
        perturb(m, 0.02, seed=1)
        perturb(m, 0.03 if cfg.num_iterations > 1 else 0.0, seed=2)  # one optimisation pass after the rollout
        m.train()

    loss_fn = GRPOLoss(cfg)
    loss_fn.prepare_model(ours)
    if cfg.num_iterations > 1:
        with torch.no_grad():
            batch["old_logps"] = completion_logps(old_model, batch, cfg.temperature, 1024)[0]
    with torch.no_grad():  # as the engine calls it
        ref = loss_fn.reference(reference, batch) if loss_fn.needs_reference_model else None

    trl_inputs = {**{k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                           "advantages")},
                  "num_items_in_batch": batch["completion_mask"].sum()}
    if cfg.num_iterations > 1:
        trl_inputs["old_per_token_logps"] = batch["old_logps"]
    if cfg.beta:
        trl_inputs["ref_per_token_logps"] = ref["logps"]
    trl_loss = trainer._compute_loss(policy, trl_inputs)
    trl_loss.backward()

    out = loss_fn(ours, batch, ref=ref) if ref is not None else loss_fn(ours, batch)
    our_loss = out.normalized({u: float(c) for u, c in loss_fn.counts(batch).items()})
    our_loss.backward()

    theirs = dict(policy.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        g1, g2 = p.grad, theirs[name].grad
        worst = max(worst, float((g1 - g2).abs().max() / g2.abs().max().clamp(min=1e-12)))
    metrics = {}
    for key in METRICS:
        if key in out.metrics and trainer._metrics["train"].get(key):
            s, c = out.metrics[key]
            metrics[key] = (float(s / c), trainer._metrics["train"][key][-1])
    rel = abs(our_loss.item() - trl_loss.item()) / max(abs(trl_loss.item()), 1e-12)
    defaults = GRPOConfig()
    knobs = {k: getattr(cfg, k) for k in OBJECTIVE[1:] if k not in ("epsilon", "epsilon_high")
             and getattr(cfg, k) != getattr(defaults, k)}
    effect = 0.0  # how much the case's knobs move the loss: each knob below is not a no-op on these inputs
    if knobs:
        plain = GRPOLoss(cfg.model_copy(update={k: getattr(defaults, k) for k in knobs}))
        with torch.no_grad():
            other = plain(ours, batch, ref=ref) if ref is not None else plain(ours, batch)
            effect = abs(float(other.normalized({u: float(c) for u, c in plain.counts(batch).items()})) -
                         our_loss.item())
    return {"loss_type": cfg.loss_type, "beta": cfg.beta, "num_iterations": cfg.num_iterations, "knobs": knobs,
            "knob_effect": effect, "metrics": metrics,
            "mask_truncated": cfg.mask_truncated_completions,
            "kl_bias_correction": cfg.use_bias_correction_kl, "alignkit_loss": our_loss.item(),
            "trl_loss": trl_loss.item(), "loss_rel": rel, "grad_rel_max": worst,
            "metrics_rel_max": max([abs(a - b) / max(abs(b), 1e-12) for a, b in metrics.values()], default=0.0)}


def compare_adaptive_entropy(path: str, tok, tmp: str, target: float, steps: int = 4) -> dict:
    """TRL's adaptive entropy controller (updated inside its `_compute_loss` at each optimizer-step boundary) against
    alignkit's (GRPOLoss.after_step, as the engine calls it) over `steps` steps on the same batch, both policies
    moved identically before each step: the loss, gradients and coefficient of every step."""
    from alignkit.plugin.context import StepContext

    cfg = GRPOConfig(num_generations=N_GEN, max_completion_length=MAX_NEW, temperature=0.7, loss_type="dapo",
                     use_adaptive_entropy=True, entropy_coef=0.05, entropy_coef_delta=0.03, entropy_coef_max=0.1,
                     entropy_target=target)
    x = inputs(tok)
    batch = {k: x[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    batch["advantages"] = advantages(combine(x["rewards_NF"], [1.0, 0.5]), N_GEN, cfg.scale_rewards)[0]
    trainer = trl_trainer(path, tok, cfg, tmp)
    policy, ours = trainer.model, tiny_model()
    ours.load_state_dict(policy.state_dict())
    loss_fn = GRPOLoss(cfg)
    loss_fn.prepare_model(ours)
    trl_inputs = {**batch, "num_items_in_batch": batch["completion_mask"].sum()}
    steps_out = []
    for step in range(steps):
        for m in (policy, ours):
            perturb(m, 0.02, seed=10 + step)
            m.train()
            m.zero_grad(set_to_none=True)
        trl_loss = trainer._compute_loss(policy, trl_inputs)
        trl_loss.backward()
        out = loss_fn(ours, batch)
        our_loss = out.normalized({u: float(c) for u, c in loss_fn.counts(batch).items()})
        our_loss.backward()
        entropy = tuple(float(v) for v in out.metrics["entropy"])
        loss_fn.after_step({"entropy": entropy}, StepContext(True, step, 0, 1))
        theirs = dict(policy.named_parameters())
        worst = max(float((p.grad - theirs[n].grad).abs().max() / theirs[n].grad.abs().max().clamp(min=1e-12))
                    for n, p in ours.named_parameters() if p.grad is not None)
        steps_out.append({"alignkit_loss": our_loss.item(), "trl_loss": trl_loss.item(),
                          "alignkit_coef": loss_fn.entropy_coef, "trl_coef": trainer.entropy_coef,
                          "entropy": entropy[0] / entropy[1], "grad_rel_max": worst})
    return {"target": target, "steps": steps_out,
            "loss_rel_max": max(abs(r["alignkit_loss"] - r["trl_loss"]) / max(abs(r["trl_loss"]), 1e-12)
                                for r in steps_out),
            "coef_abs_max": max(abs(r["alignkit_coef"] - r["trl_coef"]) for r in steps_out),
            "grad_rel_max": max(r["grad_rel_max"] for r in steps_out)}


def reward_a(prompts, completions, **kw):
    """A reward that varies within groups: completion length in characters, mod 5."""
    return [float(len(c) % 5) for c in completions]


def reward_b(prompts, completions, answer=None, **kw):
    """Not applicable (None) to rows whose answer is "skip"; else 1.0 for an even number of characters."""
    return [None if a == "skip" else float(len(c) % 2 == 0) for c, a in zip(completions, answer)]


def compare_scoring(path: str, tok, tmp: str, scale: str, aggregation: str = "sum_then_normalize") -> dict:
    """TRL's own scoring of fixed completions (a rollout_func returns them) against alignkit's rollout stage:
    advantages, reward metrics, then each side's loss and gradients on its own batch."""
    from alignkit_grpo.rollout import GRPORollout
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from alignkit.online.rewards import RewardRegistry

    x = inputs(tok)
    prompt_rows = [row[m.bool()].tolist() for row, m in zip(x["prompt_ids"], x["prompt_mask"])]
    completion_rows = [row[m.bool()].tolist() for row, m in zip(x["completion_ids"], x["completion_mask"])]
    texts = tok.batch_decode(prompt_rows[::N_GEN], skip_special_tokens=True)
    answers = ["x", "skip", "y"]

    def rollout_func(prompts, trainer):
        return {"prompt_ids": prompt_rows, "completion_ids": completion_rows, "logprobs": None}

    reward_a.__name__, reward_b.__name__ = "reward_a", "reward_b"
    args = TRLConfig(output_dir=tmp, loss_type="grpo", beta=0.0, temperature=0.7, num_generations=N_GEN,
                     max_completion_length=MAX_NEW, scale_rewards=scale, per_device_train_batch_size=N_PROMPTS * N_GEN,
                     multi_objective_aggregation=aggregation,
                     reward_weights=[1.0, 0.5], report_to=[], use_cpu=True, bf16=False, logging_steps=1)
    trainer = GRPOTrainer(model=path, reward_funcs=[reward_a, reward_b], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": "p", "answer": "x"}] * 8),
                          rollout_func=rollout_func)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    rows = [{"prompt": texts[i // N_GEN], "answer": answers[i // N_GEN]} for i in range(N_PROMPTS * N_GEN)]
    theirs = trainer._generate_and_score_completions(rows)

    registry = RewardRegistry()
    registry.add("reward_a", reward_a)
    registry.add("reward_b", reward_b)
    cfg = GRPOConfig(loss_type="grpo", num_generations=N_GEN, max_completion_length=MAX_NEW, temperature=0.7,
                     scale_rewards=scale, reward_funcs=["reward_a", "reward_b"], reward_weights=[1.0, 0.5],
                     multi_objective_aggregation=aggregation)
    rollout = GRPORollout(cfg, tok, rewards=registry)

    class Fixed:  # stands in for the generation handle: returns the same completions
        def generate(self, prompts, n, **kw):
            return [completion_rows[i * n:(i + 1) * n] for i in range(len(prompts))]

    class Ctx:
        generator, training, step, device = Fixed(), True, 0, torch.device("cpu")

        @staticmethod
        def reduce(t, op="sum"):
            return t

    width = max(map(len, prompt_rows))
    batch = {"prompt_input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r))
                                               for r in prompt_rows[::N_GEN]]),
             "prompt_attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r))
                                                    for r in prompt_rows[::N_GEN]]),
             "prompt": texts, "answer": answers}
    ours = rollout.finish([rollout(batch, ctx=Ctx)], ctx=Ctx)[0]
    adv_diff = float((ours["advantages"] - theirs["advantages"]).abs().max())
    metrics = {}
    from alignkit_grpo.loss import rollout_metrics

    for name, (total, count) in rollout_metrics(ours).items():
        if trainer._metrics["train"].get(name):
            metrics[name] = (float(total) / float(count), trainer._metrics["train"][name][-1])

    ours_model = tiny_model()
    ours_model.load_state_dict(trainer.model.state_dict())
    loss_fn = GRPOLoss(cfg)
    loss_fn.prepare_model(ours_model)
    ours_model.train()
    trl_loss = trainer._compute_loss(trainer.model, theirs)
    trl_loss.backward()
    out = loss_fn(ours_model, ours)
    our_loss = out.normalized({u: float(c) for u, c in loss_fn.counts(ours).items()})
    our_loss.backward()
    theirs_params = dict(trainer.model.named_parameters())
    worst = max(float((p.grad - theirs_params[n].grad).abs().max() / theirs_params[n].grad.abs().max().clamp(min=1e-12))
                for n, p in ours_model.named_parameters())
    return {"scale_rewards": scale, "aggregation": aggregation, "advantage_abs_max": adv_diff,
            "metrics": {k: v for k, v in metrics.items()},
            "metrics_rel_max": max(abs(a - b) / max(abs(b), 1e-12) for a, b in metrics.values()),
            "alignkit_loss": our_loss.item(), "trl_loss": trl_loss.item(),
            "loss_abs": abs(our_loss.item() - trl_loss.item()), "grad_rel_max": worst}


CLIP = {"epsilon": 0.2, "epsilon_high": 0.28}
#: adaptive entropy control: the target above every step's entropy (the coefficient rises), below (falls), between
ADAPTIVE_TARGETS = (100.0, 0.0, 5.8)
SEQ = {"importance_sampling_level": "sequence"}
#: grpo / dapo / dr_grpo, beta 0 and > 0, one and two passes, then a truncated row masked, the KL uncorrected
CASES = [dict(loss_type=t, beta=b, num_iterations=i, **CLIP)
         for t, b, i in itertools.product(["grpo", "dapo", "dr_grpo"], [0.0, 0.04], [1, 2])]
CASES += [dict(loss_type="dapo", beta=0.04, num_iterations=2, mask_truncated_completions=True, **CLIP),
          dict(loss_type="grpo", beta=0.04, num_iterations=2, use_bias_correction_kl=False, **CLIP)]
#: the rest of TRL 1.16's loss family and its knobs (two passes: ratios away from 1, so caps and gates act)
FAMILY = [dict(loss_type="bnpo", beta=b, num_iterations=i, **CLIP) for b, i in itertools.product([0.0, 0.04], [1, 2])]
FAMILY += [
    dict(loss_type="cispo", epsilon_high=5.0, beta=0.04, num_iterations=2),
    dict(loss_type="cispo", epsilon_high=1.02, num_iterations=2, mask_truncated_completions=True),
    dict(loss_type="sapo", num_iterations=1),
    dict(loss_type="sapo", beta=0.04, num_iterations=2),
    dict(loss_type="sapo", num_iterations=2, sapo_temperature_pos=0.5, sapo_temperature_neg=8.0),
    dict(loss_type="luspo", num_iterations=1, **SEQ, **CLIP),
    dict(loss_type="luspo", beta=0.04, num_iterations=2, **SEQ, epsilon=0.01, epsilon_high=0.02),
    dict(loss_type="vespo", num_iterations=1),
    dict(loss_type="vespo", beta=0.04, num_iterations=2),
    dict(loss_type="vespo", num_iterations=2, vespo_k_pos=1.0, vespo_lambda_pos=8.0, vespo_k_neg=6.0,
         vespo_lambda_neg=0.5),
    dict(loss_type="grpo", num_iterations=2, **SEQ, **CLIP),  # GSPO
    dict(loss_type="grpo", beta=0.04, num_iterations=2, **SEQ, epsilon=0.01, epsilon_high=0.02),
    dict(loss_type="dapo", num_iterations=2, **SEQ, epsilon=0.01, epsilon_high=0.02),
    dict(loss_type="dapo", num_iterations=2, epsilon=0.02, epsilon_high=0.03, delta=1.05),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, epsilon=0.02, epsilon_high=0.03, delta=1.05, **SEQ),
    dict(loss_type="dapo", num_iterations=2, top_entropy_quantile=0.2, **CLIP),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, top_entropy_quantile=0.5, mask_truncated_completions=True,
         **CLIP),
    dict(loss_type="dapo", num_iterations=1, top_entropy_quantile=0.0, **CLIP),
    dict(loss_type="dapo", num_iterations=2, off_policy_mask_threshold=0.005, **CLIP),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, off_policy_mask_threshold=0.005, top_entropy_quantile=0.5,
         **CLIP),
    dict(loss_type="dapo", num_iterations=1, entropy_coef=0.05, **CLIP),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, entropy_coef=0.05, **CLIP),
    dict(loss_type="bnpo", num_iterations=2, entropy_coef=-0.1, delta=1.05, epsilon=0.02, epsilon_high=0.03),
    dict(loss_type="cispo", epsilon_high=1.02, num_iterations=2, entropy_coef=0.05),
]
CASES += FAMILY


def describe(knobs: dict) -> str:
    short = {"importance_sampling_level": "is_level", "top_entropy_quantile": "top_entropy",
             "off_policy_mask_threshold": "opm", "entropy_coef": "ent_coef"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in knobs.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--family-only", action="store_true",
                        help="only the loss-family cases (bnpo, cispo, sapo, luspo, vespo, GSPO, delta, masks)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model().save_pretrained(f"{tmp}/model")
        tok.save_pretrained(f"{tmp}/model")
        for case in FAMILY if args.family_only else CASES:
            cfg = GRPOConfig(num_generations=N_GEN, max_completion_length=MAX_NEW, temperature=0.7, **case)
            rows.append(compare(cfg, f"{tmp}/model", tok, f"{tmp}/trl"))
        scoring = [compare_scoring(f"{tmp}/model", tok, f"{tmp}/trl-scoring", scale)
                   for scale in ("group", "batch", "none")]
        scoring.append(compare_scoring(f"{tmp}/model", tok, f"{tmp}/trl-scoring", "group", "normalize_then_sum"))
        adaptive = [compare_adaptive_entropy(f"{tmp}/model", tok, f"{tmp}/trl-adaptive", target)
                    for target in ADAPTIVE_TARGETS]
    print(f"{'loss_type':9} {'beta':>5} {'iters':>5} {'mask_trunc':>10} {'kl_is':>5} {'alignkit loss':>14} "
          f"{'TRL loss':>14} "
          f"{'loss rel':>9} {'grad rel':>9} {'metric rel':>10}  knobs (|loss change| without them)")
    for r in rows:
        print(f"{r['loss_type']:9} {r['beta']:5} {r['num_iterations']:5} {r['mask_truncated']!s:>10} "
              f"{r['kl_bias_correction']!s:>5} "
              f"{r['alignkit_loss']:14.8f} {r['trl_loss']:14.8f} {r['loss_rel']:9.1e} {r['grad_rel_max']:9.1e} "
              f"{r['metrics_rel_max']:10.1e}  {describe(r['knobs'])}"
              + (f" ({r['knob_effect']:.1e})" if r["knobs"] else ""))
    print("objective metrics compared (where the loss type logs them):", ", ".join(METRICS))
    print()
    print("TRL's own rollout scoring (fixed completions via rollout_func, two reward functions, one None on a prompt):")
    print(f"{'scale_rewards':18} {'adv abs diff':>12} {'metric rel':>10} {'alignkit loss':>14} {'TRL loss':>14} "
          f"{'loss abs':>9} {'grad rel':>9}")
    for r in scoring:
        label = r["scale_rewards"] if r["aggregation"] == "sum_then_normalize" else r["aggregation"]
        print(f"{label:18} {r['advantage_abs_max']:12.1e} {r['metrics_rel_max']:10.1e} "
              f"{r['alignkit_loss']:14.8f} "
              f"{r['trl_loss']:14.8f} {r['loss_abs']:9.1e} {r['grad_rel_max']:9.1e}")
    print("metrics compared:", ", ".join(sorted(scoring[0]["metrics"])))
    print()
    print("Adaptive entropy control (use_adaptive_entropy, dapo, entropy_coef 0.05, delta 0.03, max 0.1), 4 steps:")
    print(f"{'entropy_target':>14} {'entropy per step':>30} {'coefficient per step (both)':>30} {'loss rel':>9} "
          f"{'grad rel':>9} {'coef diff':>9}")
    for r in adaptive:
        entropies = " ".join(f"{s['entropy']:.3f}" for s in r["steps"])
        coefs = " ".join(f"{s['trl_coef']:.2f}" for s in r["steps"])
        print(f"{r['target']:14} {entropies:>30} {coefs:>30} {r['loss_rel_max']:9.1e} "
              f"{r['grad_rel_max']:9.1e} {r['coef_abs_max']:9.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows + scoring + adaptive, f, indent=1)
    # on-policy (one pass) the scoring cases' loss is ~1e-8 (minus the mean advantage): compared absolutely
    bad = [r for r in rows + scoring + adaptive
           if max(r.get("loss_rel", 0.0), r.get("loss_abs", 0.0), r["grad_rel_max"], r.get("metrics_rel_max", 0.0),
                  r.get("advantage_abs_max", 0.0), r.get("loss_rel_max", 0.0), r.get("coef_abs_max", 0.0)) > TOL]
    total = len(rows) + len(scoring) + len(adaptive)
    print(f"{total - len(bad)}/{total} cases within {TOL:g} (loss, every gradient, metrics relative; advantages and "
          "on-policy losses absolute)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
