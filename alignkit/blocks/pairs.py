"""A loss over [chosen; rejected] rows (the preference formatter's batches) through the shared log-prob path."""

import torch

from alignkit.blocks.demo import demo_defaults
from alignkit.blocks.logps import RowLogps, SequenceScorer, count_weights
from alignkit.plugin.loss import Loss, LossOutput
from alignkit.plugin.method import Method


class PairLoss(Loss):
    """Base of a reference-free loss on [chosen; rejected] rows: one `SequenceScorer` built from the method config
    (a `LogpsOptions`), the model prepared for it, and the units `pairs` and `chosen_tokens` (the chosen rows' label
    tokens, for an NLL term) counted. A subclass writes `terms` (the loss) and `metrics`."""

    eval_loss_per_batch = True  # eval_loss: the mean of per-batch losses, as TRL computes it

    def __init__(self, config):
        super().__init__(config)
        self.scorer = SequenceScorer.from_config(config)

    def prepare_model(self, model):
        self.scorer.prepare(model)

    def counts(self, batch):
        n = batch["input_ids"].shape[0] // 2
        return {"pairs": n, "chosen_tokens": int((batch["labels"][:n, 1:] != self.scorer.ignore).sum())}

    def __call__(self, model, batch, ctx=None):
        s, _, summed = self.scorer(model, batch, terms=self.terms, group_size=2,
                                   weights=count_weights(self.counts(batch), ctx))
        with torch.no_grad():
            metrics = self.metrics(s)
        return LossOutput(terms=summed, metrics=metrics)

    def terms(self, s: RowLogps, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """The summed loss terms (unit -> value) of the chosen rows of `groups` (`s` holds them first), then their
        rejected rows, as `SequenceScorer` asks for them."""
        raise NotImplementedError

    def metrics(self, s: RowLogps) -> dict[str, torch.Tensor]:
        """The logged metrics of the scored [chosen; rejected] rows (run without gradient)."""
        raise NotImplementedError


def reference_free_metrics(s: RowLogps, chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
                           nll: bool = True) -> dict[str, torch.Tensor]:
    """TRL's metrics of a reference-free pairwise loss from the scored [chosen; rejected] rows `s` and
    the per-pair values the loss rewards (`chosen`, `rejected`: summed or mean log-probs) at scale `beta`:
    rewards/chosen, /rejected, /accuracies, /margins, logps/chosen, /rejected, logits/chosen, /rejected and nll_loss
    (the chosen rows' mean token NLL; 0 with `nll=False`, as TRL logs it when the NLL is not part of the loss)."""
    n = len(chosen)
    index = torch.arange(2 * n, device=chosen.device)
    nll_sum = -s.logps[:n].sum()
    return {"rewards/chosen": beta * chosen.mean(), "rewards/rejected": beta * rejected.mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
            "rewards/margins": beta * (chosen - rejected).mean(), "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(), "logits/chosen": s.rows(index[:n]).logits_mean(True),
            "logits/rejected": s.rows(index[n:]).logits_mean(True),
            "nll_loss": nll_sum / s.tokens[:n].sum() if nll else nll_sum * 0}


def preference_method(**fields) -> Method:
    """A `Method` trained on preference pairs as the shipped pairwise methods are: the core's `preference`
    formatter, the `builtin:sort` demo with the shared demo settings (`demo_defaults()`), learning rate 1e-6 and
    rewards/accuracies on the progress bar; `fields` (name, config, loss, description, ...) add or replace."""
    return Method(**{"formatter": "preference", "defaults": {"train.learning_rate": 1e-6}, "demo_data": "sort",
                     "demo_defaults": demo_defaults(), "progress_metrics": ("rewards/accuracies",), **fields})
