"""The RLOO objective on a rolled-out batch, as TRL 1.16's RLOOTrainer: a sequence-level clipped surrogate,
-min(ratio x A, clip(ratio, 1 - epsilon, 1 + epsilon_high) x A) with ratio = exp(log pi(y) - log pi_old(y)) over
each completion's summed token log-probs (at the sampling temperature), averaged over the step's completions
(unit "completions"). The KL to the reference is already in the rewards (the rollout). In training the head runs
fused (alignkit.blocks.fusedhead.fused_row_terms): whole completions chunk by chunk, the head's gradients computed
in the forward. Every metric is an exact (sum, count) pair with TRL's name."""

import torch

import alignkit
from alignkit.blocks.fusedhead import fused_row_terms
from alignkit.blocks.lmhead import require_head
from alignkit.blocks.logps import entropy_of
from alignkit.online.completions import completion_inputs
from alignkit.online.groups import GroupLoss
from alignkit_rloo.config import RLOOConfig


def per_sequence_loss(logps, old_logps, advantages, config: RLOOConfig):
    """(loss [B], ratio [B]) of the clipped surrogate on summed completion log-probs."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - config.epsilon, 1 + config.epsilon_upper)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


class RLOOLoss(GroupLoss):
    """Reads the rollout's batch: prompt/completion ids and masks, `advantages` [B], optional `old_logps` [B]
    (num_iterations > 1), and the rollout's reward statistics for the metrics."""

    config: RLOOConfig

    def __init__(self, config: RLOOConfig) -> None:
        super().__init__(config)
        self._checked: set[int] = set()

    def counts(self, batch):
        return {"completions": int(batch["completion_ids"].shape[0])}

    def reference(self, ref_model, batch):
        """Nothing per micro-batch: the rollout scores the reference once per rollout (its KL is in the rewards)."""
        return {}

    def __call__(self, model, batch, ref=None):
        mask = batch["completion_mask"]
        old = batch.get("old_logps")
        if self.head is not None and torch.is_grad_enabled():
            total, logps, entropy = self._fused(model, batch, old)
        else:
            inputs, labels = completion_inputs(batch)
            s = self.scorer(model, inputs, labels)
            logps, entropy = s.per_row(), s.entropy.sum()
            total = per_sequence_loss(logps, logps.detach() if old is None else old, batch["advantages"],
                                      self.config)[0].sum()
        with torch.no_grad():
            _, ratio = per_sequence_loss(logps.detach(), logps.detach() if old is None else old, batch["advantages"],
                                         self.config)
            metrics = self._metrics(batch, mask, ratio, entropy)
        return alignkit.LossOutput(terms={"completions": total}, metrics=metrics)

    def _fused(self, model, batch, old):
        """(the summed loss, each completion's log-prob sum [B] and the summed entropy, both without gradient)."""
        inputs, labels = completion_inputs(batch)
        outputs, hidden_BTH = self.scorer.hidden_states(model, inputs)  # each prompt once for its group
        require_head(self.head, outputs, self._checked)
        targets_BT = labels[:, 1:]
        select_BT = targets_BT != -100
        rows = len(labels)
        rows_N = torch.arange(rows, device=labels.device)[:, None].expand_as(select_BT)[select_BT]
        adv = batch["advantages"]

        def term(sums, index):
            o = sums.detach() if old is None else old[index]
            return per_sequence_loss(sums, o, adv[index], self.config)[0].sum()

        total, logps, extra = fused_row_terms(self.head, hidden_BTH[:, :-1][select_BT], targets_BT[select_BT],
                                              rows_N, rows, self.head.chunk_positions(self.config.logits_chunk_size),
                                              term,
                                              stats=lambda logits, targets: (entropy_of(logits),),
                                              temperature=self.config.temperature)
        entropy = extra[0].sum() if extra else logps.new_zeros(())
        return total, logps, entropy

    def _metrics(self, batch, mask, ratio, entropy) -> dict:
        cfg, n, adv = self.config, batch["completion_ids"].shape[0], batch["advantages"]
        low = ((ratio < 1 - cfg.epsilon) & (adv < 0)).float()
        high = ((ratio > 1 + cfg.epsilon_upper) & (adv > 0)).float()
        metrics = {"entropy": (entropy, mask.sum()),
                   "clip_ratio/low_mean": (low.sum(), n), "clip_ratio/high_mean": (high.sum(), n),
                   "clip_ratio/region_mean": ((low + high).clamp(max=1).sum(), n)}
        if "kl_sum" in batch:
            metrics["kl"] = (batch["kl_sum"].sum(), mask.sum())
        if "completion_length" in batch:
            metrics.update(rollout_metrics(batch))
        return metrics


def rollout_metrics(batch: dict) -> dict:
    """Reward and completion statistics the rollout attached to the batch, as (sum, count) pairs."""
    n = batch["completion_length"].shape[0]
    rewards = batch["rewards"]  # [B] weighted sum over functions, NaN where no function applied
    out = {"completions/mean_length": (batch["completion_length"].float().sum(), n),
           "completions/clipped_ratio": (batch["is_truncated"].float().sum(), n),
           "reward": (rewards.nan_to_num(0.0).sum(), (~torch.isnan(rewards)).sum())}
    for i, name in enumerate(batch["reward_names"]):
        column = batch["rewards_per_func"][:, i]
        out[f"rewards/{name}/mean"] = (column.nan_to_num(0.0).sum(), (~torch.isnan(column)).sum())
        if "reward_std_per_func" in batch:  # the step's std of the function, repeated on every row
            out[f"rewards/{name}/std"] = (batch["reward_std_per_func"][:, i].sum(), n)
    out["reward_std"] = (batch["reward_std"].sum(), n)  # the step's std, repeated on every row
    out["frac_reward_zero_std"] = (batch["zero_std"].float().sum(), n)
    return out
