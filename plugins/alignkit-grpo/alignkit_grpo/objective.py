"""The per-token objectives of TRL 1.16's GRPO loss family, the token masks they may apply, and their units.

Loss units (the engine divides each summed term by its unit's count over the whole step and all processes):
  grpo, sapo          "completions": each completion's mean token loss, summed; / completions in the step.
  dr_grpo             "completions": each completion's summed token loss / max_completion_length; / completions.
  luspo               "completions": each completion's summed token loss (its sequence loss x its length).
  dapo, cispo, vespo  "tokens": every counted token's loss, summed; / counted tokens in the step.
  bnpo                "micro_batches": the micro-batch's token mean; / micro-batches in the step (all processes).
                      TRL divides by the tokens of its local batch, then by the accumulation steps, and DDP
                      averages over processes: the same number when a micro-batch is TRL's per-device batch.
"""

import math

import torch

from alignkit_grpo.config import CLIPPED, GRPOConfig

UNITS = {"grpo": "completions", "sapo": "completions", "dr_grpo": "completions", "luspo": "completions",
         "dapo": "tokens", "cispo": "tokens", "vespo": "tokens", "bnpo": "micro_batches"}


def unit_counts(mask: torch.Tensor, config: GRPOConfig) -> dict[str, int]:
    """How many of its loss type's unit a micro-batch with this completion mask holds."""
    unit = UNITS[config.loss_type]
    if unit == "tokens":
        return {unit: int(mask.sum())}
    return {unit: 1 if unit == "micro_batches" else int(mask.shape[0])}


def reduce_terms(per_token_loss, mask, config: GRPOConfig) -> dict[str, torch.Tensor]:
    """The summed loss term of the loss type's unit for this micro-batch. `per_token_loss` is [B, C], or [B, 1]
    (a sequence-level loss without KL), spread over the completion's counted tokens."""
    masked, kind = per_token_loss * mask, config.loss_type
    if kind in ("grpo", "sapo"):
        return {"completions": (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()}
    if kind == "dr_grpo":
        return {"completions": masked.sum() / config.max_completion_length}
    if kind == "bnpo":
        return {"micro_batches": masked.sum() / mask.sum().clamp(min=1.0)}
    return {UNITS[kind]: masked.sum()}


def token_weights(mask, config: GRPOConfig) -> tuple[str, torch.Tensor]:
    """(unit, per-token weights [B, C]) with sum(weights * per_token_loss) equal to `reduce_terms`' term."""
    kind = config.loss_type
    if kind in ("grpo", "sapo"):
        return "completions", mask / mask.sum(-1, keepdim=True).clamp(min=1.0)
    if kind == "dr_grpo":
        return "completions", mask / config.max_completion_length
    if kind == "bnpo":
        return "micro_batches", mask / mask.sum().clamp(min=1.0)
    return UNITS[kind], mask


def importance_ratio(logps, old_logps, config: GRPOConfig, mask=None) -> torch.Tensor:
    """exp(log-ratio) per token [B, C], or per completion [B, 1] from its mean over counted tokens (GSPO)."""
    log_ratio = logps - old_logps
    if config.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    return torch.exp(log_ratio)


@torch.no_grad()
def gamma_weights(advantages, log_ratio, mask, config: GRPOConfig) -> torch.Tensor:
    """VESPO's weight phi(w) = exp(lambda + k log w - lambda w) [B, 1] of the sequence ratio w = exp(sum of
    log-ratios), phi(1) = 1; k and lambda by the advantage's sign; 0 where it overflows. A constant (no grad)."""
    low = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(low, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def per_token_objective(logps, old_logps, advantages, config: GRPOConfig, ref_logps=None, mask=None, keep=None):
    """(per-token loss [B, C] or [B, 1], importance ratio as the clip metrics read it, k3 KL [B, C] or None).

    `advantages` is [B] (one per completion) or shaped like `logps` (one per token). `mask` (the counted tokens)
    is needed by sequence-level ratios and vespo; `keep` multiplies the policy term (entropy / off-policy
    masks) before the KL is added. Inputs of one token each (1-D) suit the token-local configurations.
    """
    cfg = config
    adv = advantages if advantages.shape == logps.shape else advantages[:, None]
    ratio = importance_ratio(logps, old_logps, cfg, mask)
    kl = None
    if cfg.beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(ratio, max=cfg.epsilon_upper).detach() * adv * logps
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif cfg.loss_type == "vespo":
        loss = -gamma_weights(adv, logps - old_logps, mask, cfg) * adv * logps
    else:
        clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon_upper)
        if cfg.delta is not None:  # two-sided: the unclipped branch capped too (it wins for negative advantages)
            ratio = torch.clamp(ratio, max=cfg.delta)
        loss = -torch.min(ratio * adv, clipped * adv)
    if keep is not None:
        loss = loss * keep
    if kl is not None:
        loss = loss + cfg.beta * kl
    return loss, ratio, kl


@torch.no_grad()
def sampling_correction(logps, sampling_logps, mask, config: GRPOConfig) -> torch.Tensor:
    """TRL's importance weights between the policy that trains (`logps`, taken without gradient) and the older
    copy that sampled: per token [B, C] or per completion [B, 1] (the exp of the summed log-ratios), clipped to
    [clip_min, clip_max] (*_truncate) or zero outside it (*_mask)."""
    diff = ((logps.detach() - sampling_logps) * mask).nan_to_num(0.0)
    if config.importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    low, high = config.importance_sampling_clip_min, config.importance_sampling_clip_max
    if config.importance_sampling_mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    outside = (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))
    return ratio.masked_fill(outside, 0.0)


def high_entropy_mask(entropy, mask, quantile: float, gather=None) -> torch.Tensor:
    """Counted tokens whose entropy is at least the (1 - quantile) quantile of the counted tokens' entropies
    (of every process: `gather` concatenates a 1-D tensor over processes)."""
    values = entropy[mask.bool()].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - quantile)
    return ((entropy * mask) >= threshold) & mask.bool()


def off_policy_keep(advantages, logps, sampling_logps, mask, threshold: float) -> torch.Tensor:
    """[B, 1]: 0 for completions with a negative advantage whose mean KL(sampler || policy) over counted tokens
    exceeds `threshold` (DeepSeek-V3.2's off-policy sequence mask), 1 elsewhere."""
    kl = (sampling_logps - logps.detach()).nan_to_num(nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def clip_metrics(ratio, advantages, mask, config: GRPOConfig, logps=None, old_logps=None) -> dict:
    """TRL's clipping metrics of the loss type as (sum, count) pairs: a per-token value over counted tokens, a
    per-completion one ([B, 1]) over completions."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]

    def mean(x):
        x = x.float()
        return (x.sum(), x.shape[0]) if x.shape[1] == 1 else ((x * mask).sum(), mask.sum())

    if config.loss_type in CLIPPED:
        low = (ratio < 1 - config.epsilon) & (adv < 0)
        high = (ratio > 1 + config.epsilon_upper) & (adv > 0)
        return {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
                "clip_ratio/region_mean": mean(low | high)}
    if config.loss_type == "cispo":
        return {"cispo_clip_ratio": mean((ratio > config.epsilon_upper) & (adv > 0))}
    if config.loss_type == "vespo":
        return {"vespo/phi_seq_mean": mean(gamma_weights(adv, logps - old_logps, mask, config))}
    return {}
