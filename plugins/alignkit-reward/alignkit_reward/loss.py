"""The reward model's pairwise loss (TRL 1.16 RewardTrainer.compute_loss).

With r the one-label classifier's score of each sequence (read at its last non-pad token by the model itself):

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected - margin)
           + center_rewards_coefficient * mean over pairs of (r_chosen + r_rejected)^2

`margin` is the batch's `margin` column (0 without one). Metrics are exact (sum, count) means over every pair of a
step or an evaluation: TRL's `accuracy` (r_chosen > r_rejected), `margin` (r_chosen - r_rejected, without the
column), `mean_reward` (every sequence), and the mean chosen and rejected rewards (`rewards/chosen`,
`rewards/rejected`).
"""

import torch
import torch.nn.functional as F

from alignkit import ConfigError, Loss, LossOutput
from alignkit.blocks.dropout import disable_dropout
from alignkit.blocks.prefix_attention import enable_prefix_attention
from alignkit.blocks.sharing import SHARING_ATTENTION, attention_of, common_prefix, sequence_classifier, shared_scores
from alignkit.plugin.loss import at_least_fp32


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair losses [B] of the chosen and rejected rewards [B]."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


class RewardLoss(Loss):
    """One forward of the classifier over the B chosen then the B rejected sequences: each pair as one row, their
    common prefix (the prompt) run once, where `share_prompt` allows and the model supports it."""

    #: TRL's num_tokens: the input tokens (chosen and rejected) trained on so far
    running_totals = {"num_tokens": "input_tokens"}

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)
        share, classifier = getattr(self.config, "share_prompt", None), sequence_classifier(model)
        if share is not False and classifier is not None:
            enable_prefix_attention(classifier)  # sdpa, with the shared rows' first part causal (no full mask)
        if share and classifier is None:
            config = getattr(model, "config", None)
            raise ConfigError(
                f"method.share_prompt needs a transformers sequence classifier with a pad token and an attention "
                f"implementation in {', '.join(SHARING_ATTENTION)} with full attention in every layer (this model: "
                f"{type(model).__name__}, {attention_of(config) if config is not None else None}); set "
                f"method.share_prompt=false")

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"pairs": batch["input_ids"].shape[0] // 2, "input_tokens": int(batch["attention_mask"].sum())}

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        classifier = sequence_classifier(model) if getattr(self.config, "share_prompt", None) is not False else None
        if classifier is not None and int(common_prefix(ids, mask).min()) > 0:
            logits = shared_scores(model, classifier, ids, mask)
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        rewards = at_least_fp32(logits[:, 0])
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        losses = reward_losses(chosen, rejected, batch.get("margin"), self.config.center_rewards_coefficient)
        with torch.no_grad():
            r, diff = rewards.detach(), (chosen - rejected).detach()
            metrics = {"accuracy": ((diff > 0).sum(), n), "margin": (diff.sum(), n), "mean_reward": (r.sum(), 2 * n),
                       "rewards/chosen": (r[:n].sum(), n), "rewards/rejected": (r[n:].sum(), n)}
        return LossOutput(terms={"pairs": losses.sum()}, metrics=metrics)
