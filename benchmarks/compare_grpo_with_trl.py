"""alignkit's GRPO loss and gradients against TRL's GRPOTrainer loss computation, on the same inputs.

Both sides get the same tiny model (saved to a folder and loaded by each), the same prompts, sampled
completions (with padding and a truncated row), advantages (alignkit_grpo.advantages from the same
rewards), old log-probs (num_iterations 2) and frozen reference (beta > 0). TRL runs its own
`GRPOTrainer._compute_loss` on the inputs dict it builds in `_generate_and_score_completions`; alignkit
runs `GRPOLoss` normalised by its counts, as the engine does. The policy is moved away from the
reference (and from the old policy) so the ratio, clipping and KL terms are all active.

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
from alignkit_grpo.advantages import advantages, combine
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.logps import completion_logps
from alignkit_grpo.loss import GRPOLoss
from datasets import Dataset

from alignkit.testing import tiny_model, tiny_tokenizer

TOL = 1e-5
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

    args = TRLConfig(output_dir=out, loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon,
                     epsilon_high=cfg.epsilon_high, temperature=cfg.temperature, num_generations=N_GEN,
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
    for key in ("entropy", "kl", "clip_ratio/region_mean"):
        if key in out.metrics and trainer._metrics["train"].get(key):
            s, c = out.metrics[key]
            metrics[key] = (float(s / c), trainer._metrics["train"][key][-1])
    rel = abs(our_loss.item() - trl_loss.item()) / max(abs(trl_loss.item()), 1e-12)
    return {"loss_type": cfg.loss_type, "beta": cfg.beta, "num_iterations": cfg.num_iterations,
            "mask_truncated": cfg.mask_truncated_completions,
            "kl_bias_correction": cfg.use_bias_correction_kl, "alignkit_loss": our_loss.item(),
            "trl_loss": trl_loss.item(), "loss_rel": rel, "grad_rel_max": worst,
            "metrics_rel_max": max([abs(a - b) / max(abs(b), 1e-12) for a, b in metrics.values()], default=0.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model().save_pretrained(f"{tmp}/model")
        tok.save_pretrained(f"{tmp}/model")
        cases = list(itertools.product(["grpo", "dapo", "dr_grpo"], [0.0, 0.04], [1, 2]))
        cases = [(*c, False, True) for c in cases] + [("dapo", 0.04, 2, True, True), ("grpo", 0.04, 2, False, False)]
        for loss_type, beta, iterations, mask_truncated, bias_correction in cases:
            cfg = GRPOConfig(loss_type=loss_type, beta=beta, num_iterations=iterations, num_generations=N_GEN,
                             max_completion_length=MAX_NEW, temperature=0.7, epsilon=0.2, epsilon_high=0.28,
                             mask_truncated_completions=mask_truncated, use_bias_correction_kl=bias_correction)
            rows.append(compare(cfg, f"{tmp}/model", tok, f"{tmp}/trl"))
    print(f"{'loss_type':9} {'beta':>5} {'iters':>5} {'mask_trunc':>10} {'kl_is':>5} {'alignkit loss':>14} {'TRL loss':>14} "
          f"{'loss rel':>9} {'grad rel':>9} {'metric rel':>10}")
    for r in rows:
        print(f"{r['loss_type']:9} {r['beta']:5} {r['num_iterations']:5} {r['mask_truncated']!s:>10} {r['kl_bias_correction']!s:>5} "
              f"{r['alignkit_loss']:14.8f} {r['trl_loss']:14.8f} {r['loss_rel']:9.1e} {r['grad_rel_max']:9.1e} "
              f"{r['metrics_rel_max']:10.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if max(r["loss_rel"], r["grad_rel_max"], r["metrics_rel_max"]) > TOL]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases within {TOL:g} relative (loss, every gradient, metrics)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
