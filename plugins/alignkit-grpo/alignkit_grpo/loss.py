"""The GRPO objective on a rolled-out batch: clipped surrogate, k3 KL to a reference, token normalisation.

Loss units (the engine divides each summed term by its count over the whole step and all processes):
  grpo     "completions": each completion's mean token loss, summed; / completions in the step.
  dr_grpo  "completions": each completion's summed token loss / max_completion_length; / completions.
  dapo     "tokens": every counted token's loss, summed; / counted tokens in the step.
Every metric is an exact (sum, count) pair with TRL 1.x's name.
"""

import torch

import alignkit
from alignkit.blocks.dropout import disable_dropout
from alignkit.blocks.lmhead import LMHead
from alignkit.blocks.logps import TokenScorer
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.logps import completion_inputs, completion_logps, per_completion_token


def per_token_objective(logps, old_logps, advantages, config: GRPOConfig, ref_logps=None):
    """(per-token loss [B, C], ratio [B, C], k3 KL [B, C] or None). `advantages` is [B] (one per completion) or
    shaped like `logps` (one per token)."""
    adv = advantages if advantages.shape == logps.shape else advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - config.epsilon, 1 + config.epsilon_upper)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if config.beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if config.use_bias_correction_kl:
            kl = kl * ratio
        loss = loss + config.beta * kl
    return loss, ratio, kl


def reduce_terms(per_token_loss, mask, config: GRPOConfig) -> dict[str, torch.Tensor]:
    """The summed loss term of each unit for this micro-batch (see the module docstring)."""
    masked = per_token_loss * mask
    if config.loss_type == "grpo":
        return {"completions": (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()}
    if config.loss_type == "dr_grpo":
        return {"completions": masked.sum() / config.max_completion_length}
    return {"tokens": masked.sum()}


def token_weights(mask, config: GRPOConfig) -> tuple[str, torch.Tensor]:
    """(unit, per-token weights [B, C]) with sum(weights * per_token_loss) equal to `reduce_terms`' term."""
    if config.loss_type == "grpo":
        return "completions", mask / mask.sum(-1, keepdim=True).clamp(min=1.0)
    if config.loss_type == "dr_grpo":
        return "completions", mask / config.max_completion_length
    return "tokens", mask


class GRPOLoss(alignkit.Loss):
    """Reads the rollout's batch: prompt/completion ids and masks, `advantages` [B], optional `old_logps` [B, C]
    (num_iterations > 1), and the rollout's reward statistics for the metrics."""

    head: LMHead | None = None  # the policy's split-off head: training runs the fused head; None: checkpointed chunks

    def __init__(self, config: GRPOConfig) -> None:
        super().__init__(config)
        self.scorer = TokenScorer.from_config(config, temperature=config.temperature)

    @property
    def needs_reference_model(self) -> bool:  # beta == 0 loads no reference model
        return self.config.beta != 0.0

    def prepare_model(self, model):
        disable_dropout(model)
        self.head = self.scorer.head_of(model)

    def counts(self, batch):
        if self.config.loss_type == "dapo":
            return {"tokens": int(batch["completion_mask"].sum())}
        return {"completions": int(batch["completion_ids"].shape[0])}

    def _logps(self, model, batch):
        return completion_logps(model, batch, self.config.temperature, self.config.logits_chunk_size, self.scorer)

    def reference(self, ref_model, batch):
        logps, _ = self._logps(ref_model, batch)
        return {"logps": logps}

    def __call__(self, model, batch, ref=None):
        cfg = self.config
        mask = batch["completion_mask"].to(torch.float32)
        if self.head is not None and torch.is_grad_enabled():
            return self._fused(model, batch, ref, mask)
        logps, entropy = self._logps(model, batch)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        per_token, ratio, kl = per_token_objective(logps, old, batch["advantages"], cfg,
                                                   None if ref is None else ref["logps"])
        terms = reduce_terms(per_token, mask, cfg)
        with torch.no_grad():
            metrics = self._metrics(batch, mask, ratio, entropy, kl)
        return alignkit.LossOutput(terms=terms, metrics=metrics)

    def _fused(self, model, batch, ref, mask):
        """Training on the fused head (alignkit.blocks.fusedhead): the per-token objective's head gradients are computed
        in the forward, chunk by chunk over the counted tokens; nothing is recomputed in the backward."""
        cfg = self.config
        select = mask.bool()
        unit, weights = token_weights(mask, cfg)
        w_N, adv_N = weights[select], batch["advantages"][:, None].expand_as(mask)[select]
        old = batch.get("old_logps")
        old_N = None if old is None else old[select]
        ref_N = None if ref is None else ref["logps"][select]

        def term(lp, positions):
            o = lp.detach() if old_N is None else old_N[positions]
            per_token, _, _ = per_token_objective(lp, o, adv_N[positions], cfg,
                                                  None if ref_N is None else ref_N[positions])
            return (w_N[positions] * per_token).sum()

        s = self.scorer(model, *completion_inputs(batch), term=term)
        with torch.no_grad():
            logps, entropy = per_completion_token(s, s.logps, batch), per_completion_token(s, s.entropy, batch)
            _, ratio, kl = per_token_objective(logps, logps if old is None else old, batch["advantages"], cfg,
                                               None if ref is None else ref["logps"])
            metrics = self._metrics(batch, mask, ratio, entropy, kl)
        return alignkit.LossOutput(terms={unit: s.total}, metrics=metrics)

    def _metrics(self, batch, mask, ratio, entropy, kl) -> dict:
        cfg, tokens = self.config, mask.sum()
        adv = batch["advantages"][:, None]
        low = ((ratio < 1 - cfg.epsilon) & (adv < 0)).float() * mask
        high = ((ratio > 1 + cfg.epsilon_upper) & (adv > 0)).float() * mask
        metrics = {"entropy": ((entropy * mask).sum(), tokens),
                   "clip_ratio/low_mean": (low.sum(), tokens), "clip_ratio/high_mean": (high.sum(), tokens),
                   "clip_ratio/region_mean": ((low + high).clamp(max=1).sum(), tokens)}
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
    out["reward_std"] = (batch["reward_std"].sum(), n)  # the step's std, repeated on every row
    out["frac_reward_zero_std"] = (batch["zero_std"].float().sum(), n)
    return out
