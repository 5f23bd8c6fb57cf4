"""The GRPO loss on a rolled-out batch: TRL 1.16's loss family (alignkit_grpo.objective: the per-token objectives,
their masks and normalisation units), the k3 KL to a reference, on the fused LM head where each token's loss is
its own. Every metric is an exact (sum, count) pair with TRL 1.x's name.
"""

import torch

import alignkit
from alignkit.online.completions import completion_inputs, completion_logps, per_completion_token
from alignkit.online.groups import GroupLoss
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.objective import (
    clip_metrics,
    high_entropy_mask,
    off_policy_keep,
    per_token_objective,
    reduce_terms,
    sampling_correction,
    token_weights,
    unit_counts,
)

__all__ = ["GRPOLoss", "per_token_objective", "reduce_terms", "rollout_metrics", "token_weights"]


def gather_over_processes(values: torch.Tensor, ctx) -> torch.Tensor:
    """A 1-D tensor concatenated over all processes in process order, with two sums (ctx.reduce)."""
    if ctx is None or ctx.num_processes == 1:
        return values
    sizes = torch.zeros(ctx.num_processes, dtype=torch.float64, device=values.device)
    sizes[ctx.process_index] = values.numel()
    sizes = ctx.reduce(sizes, "sum").long().tolist()
    start = sum(sizes[:ctx.process_index])
    out = torch.zeros(sum(sizes), dtype=values.dtype, device=values.device)
    out[start:start + values.numel()] = values
    return ctx.reduce(out, "sum").to(values.device)


class GRPOLoss(GroupLoss):
    """Reads the rollout's batch: prompt/completion ids and masks, `advantages` [B], optional `old_logps` [B, C]
    (num_iterations > 1), and the rollout's reward statistics for the metrics."""

    config: GRPOConfig

    @property
    def collective(self) -> bool:  # the entropy quantile spans the micro-batch's tokens on every process
        return self.config.top_entropy_quantile < 1.0

    def __init__(self, config: GRPOConfig) -> None:
        super().__init__(config)  # (GroupLoss: sync_ref_model becomes Loss.reference_sync)
        self.entropy_coef, self.last_entropy = config.entropy_coef, float("inf")  # adaptive entropy control's state

    def counts(self, batch):
        counts = unit_counts(batch["completion_mask"], self.config)
        return {**counts, "micro_batches": 1} if self.config.entropy_bonus else counts

    def applied_entropy_coef(self) -> float:
        """The entropy bonus's coefficient this step: under adaptive control, only while the last step's entropy
        was at or below the target (TRL's gating)."""
        cfg = self.config
        if cfg.use_adaptive_entropy and self.last_entropy > cfg.entropy_target:
            return 0.0
        return self.entropy_coef

    def after_step(self, totals, ctx):
        """Adaptive entropy control (use_adaptive_entropy): the step's mean token entropy over every process moves
        the coefficient by entropy_coef_delta toward more bonus (entropy <= target) or less; the coefficient is
        logged as entropy_coef once per step, after its update (TRL's log)."""
        cfg = self.config
        if not cfg.use_adaptive_entropy:
            return None
        summed, tokens = ctx.reduce(torch.tensor(totals.get("entropy", (0.0, 0.0)), dtype=torch.float64,
                                                 device=ctx.device)).tolist()
        self.last_entropy = summed / max(tokens, 1.0)
        step = cfg.entropy_coef_delta if self.last_entropy <= cfg.entropy_target else -cfg.entropy_coef_delta
        self.entropy_coef = min(max(self.entropy_coef + step, cfg.entropy_coef_min), cfg.entropy_coef_max)
        return {"entropy_coef": (self.entropy_coef, 1)}

    def state_dict(self):
        last = None if self.last_entropy == float("inf") else self.last_entropy
        return {"entropy_coef": self.entropy_coef, "last_entropy": last} if self.config.use_adaptive_entropy else {}

    def load_state_dict(self, state):
        if "entropy_coef" in state:
            self.entropy_coef = float(state["entropy_coef"])
            last = state.get("last_entropy")
            self.last_entropy = float("inf") if last is None else float(last)

    def _logps(self, model, batch):
        return completion_logps(model, batch, self.config.temperature, self.config.logits_chunk_size, self.scorer)

    def reference(self, ref_model, batch):
        logps, _ = self._logps(ref_model, batch)
        return {"logps": logps}

    def __call__(self, model, batch, ref=None, ctx=None):
        cfg = self.config
        mask = batch["completion_mask"].to(torch.float32)
        if torch.is_grad_enabled() and cfg.token_local and (self.head is not None or cfg.entropy_bonus):
            return self._fused(model, batch, ref, mask, ctx)
        logps, entropy = self._logps(model, batch)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        keep = self._keep(batch, logps, old, entropy, mask, ctx)
        per_token, ratio, kl = per_token_objective(logps, old, batch["advantages"], cfg,
                                                   None if ref is None else ref["logps"], mask=mask, keep=keep)
        terms = reduce_terms(per_token, mask, cfg)
        if cfg.entropy_bonus:  # here without gradient (evaluation): the bonus needs a token-local objective
            bonus = self.applied_entropy_coef() * (entropy * mask).sum() / mask.sum().clamp(min=1.0)
            terms["micro_batches"] = terms.get("micro_batches", 0.0) - bonus
        with torch.no_grad():
            metrics = self._metrics(batch, mask, ratio, entropy, kl, logps, old)
            if cfg.corrects_staleness and "sampling_logps" in batch:
                metrics.update(self._correction_metrics(old, batch["sampling_logps"], mask))
        return alignkit.LossOutput(terms=terms, metrics=metrics)

    def _correction_metrics(self, logps, sampled, mask) -> dict:
        """TRL's sampling/importance_sampling_ratio/mean (per token, or per completion in sequence modes) and the
        mean |log-prob difference| between the training policy and the copy that sampled, over counted tokens."""
        weights = sampling_correction(logps, sampled, mask, self.config)
        tokens = mask.sum()
        mean = (weights.sum(), weights.shape[0]) if weights.shape[1] == 1 else ((weights * mask).sum(), tokens)
        return {"sampling/importance_sampling_ratio/mean": mean,
                "sampling/sampling_logp_difference/mean": (((logps - sampled).abs() * mask).sum(), tokens)}

    def _keep(self, batch, logps, old, entropy, mask, ctx):
        """What multiplies the policy term per token (None: nothing): the top entropy quantile, the off-policy
        sequence mask (against the sampling copy's log-probs when the rollout was sampled ahead, else the old
        ones), and the importance weights to that copy (TRL's order)."""
        cfg, keep = self.config, None
        sampled = batch.get("sampling_logps")
        if cfg.top_entropy_quantile < 1.0:
            gather = None if ctx is None else (lambda v: gather_over_processes(v, ctx))
            keep = high_entropy_mask(entropy, mask, cfg.top_entropy_quantile, gather).to(mask.dtype)
        if cfg.off_policy_mask_threshold is not None:
            opm = off_policy_keep(batch["advantages"], logps, old if sampled is None else sampled, mask,
                                  cfg.off_policy_mask_threshold)
            keep = opm if keep is None else keep * opm
        if cfg.corrects_staleness and sampled is not None:  # old: the policy at the rollout's first pass
            weights = sampling_correction(old, sampled, mask, cfg)
            keep = weights if keep is None else keep * weights
        return keep

    def _fused(self, model, batch, ref, mask, ctx=None):
        """Training on the fused head (alignkit.blocks.fusedhead): the per-token objective's head gradients are computed
        in the forward, chunk by chunk over the counted tokens; nothing is recomputed in the backward.

        The entropy bonus (a "micro_batches" term) joins the objective's term, rescaled by the ratio of the two
        units' step totals, so the one summed term the fused head differentiates is divided as both should be."""
        cfg = self.config
        select = mask.bool()
        unit, weights = token_weights(mask, cfg)
        w_N, adv_N = weights[select], batch["advantages"][:, None].expand_as(mask)[select]
        old = batch.get("old_logps")
        old_N = None if old is None else old[select]
        ref_N = None if ref is None else ref["logps"][select]
        sampled = batch.get("sampling_logps") if cfg.corrects_staleness else None
        sampled_N = None if sampled is None else sampled[select]  # token-level weights only (token_local)
        bonus_N = None
        if cfg.entropy_bonus:
            totals = getattr(ctx, "totals", None) or self.counts(batch)
            scale = self.applied_entropy_coef() * totals[unit] / totals["micro_batches"]
            bonus_N = (mask / mask.sum().clamp(min=1.0))[select] * scale

        def term(lp, positions, logprobs=None):
            o = lp.detach() if old_N is None else old_N[positions]
            keep = None if sampled_N is None else sampling_correction(o, sampled_N[positions], 1.0, cfg)
            per_token, _, _ = per_token_objective(lp, o, adv_N[positions], cfg,
                                                  None if ref_N is None else ref_N[positions], keep=keep)
            value = (w_N[positions] * per_token).sum()
            if logprobs is not None:  # the entropy of each position's distribution, differentiable
                value = value + (bonus_N[positions] * (logprobs.exp() * logprobs).sum(-1)).sum()
            return value

        s = self.scorer(model, *completion_inputs(batch), term=term, distribution=bonus_N is not None)
        with torch.no_grad():
            logps, entropy = per_completion_token(s, s.logps, batch), per_completion_token(s, s.entropy, batch)
            old = logps if old is None else old
            per_token, ratio, kl = per_token_objective(logps, old, batch["advantages"], cfg,
                                                       None if ref is None else ref["logps"])
            metrics = self._metrics(batch, mask, ratio, entropy, kl, logps, old)
            if sampled is not None:
                metrics.update(self._correction_metrics(old, sampled, mask))
            if bonus_N is not None:  # TRL's names: the objective without the bonus, and the coefficient
                metrics["policy_loss"] = (reduce_terms(per_token, mask, cfg)[unit], unit_counts(mask, cfg)[unit])
                if not cfg.use_adaptive_entropy:  # (adaptive: the coefficient after the step, from after_step)
                    metrics["entropy_coef"] = (self.entropy_coef, 1)
        return alignkit.LossOutput(terms={unit: s.total}, metrics=metrics)

    def _metrics(self, batch, mask, ratio, entropy, kl, logps, old) -> dict:
        tokens = mask.sum()
        metrics = {"entropy": ((entropy * mask).sum(), tokens),
                   **clip_metrics(ratio, batch["advantages"], mask, self.config, logps, old)}
        if kl is not None:
            metrics["kl"] = ((kl * mask).sum(), tokens)
        metrics.update(rollout_metrics(batch))
        return metrics


def rollout_metrics(batch: dict) -> dict:
    """Reward and completion statistics the rollout attached to the batch, as (sum, count) pairs."""
    out: dict = {}
    if "completion_length" not in batch:
        return out
    n = batch["completion_length"].shape[0]
    out["completions/mean_length"] = (batch["completion_length"].float().sum(), n)
    out["completions/clipped_ratio"] = (batch["is_truncated"].float().sum(), n)
    rewards = batch["rewards"]  # [B] weighted sum over functions, NaN where no function applied
    scored = ~torch.isnan(rewards)
    out["reward"] = (rewards.nan_to_num(0.0).sum(), scored.sum())
    for i, name in enumerate(batch["reward_names"]):
        column = batch["rewards_per_func"][:, i]
        applied = ~torch.isnan(column)
        out[f"rewards/{name}/mean"] = (column.nan_to_num(0.0).sum(), applied.sum())
        if "reward_std_per_func" in batch:  # the step's std, repeated on every row
            out[f"rewards/{name}/std"] = (batch["reward_std_per_func"][:, i].sum(), n)
    for name, values in batch.get("episode_stats", {}).items():  # multi-turn rollouts: turns, tool calls
        out[f"episodes/{name}/mean"] = (values.float().sum(), n)
    out["reward_std"] = (batch["reward_std"].sum(), n)  # the step's std, repeated on every row
    out["frac_reward_zero_std"] = (batch["zero_std"].float().sum(), n)
    return out
