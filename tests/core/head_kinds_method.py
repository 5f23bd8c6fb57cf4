"""Two methods a third-party plugin could write through the public API only (importable as `head_kinds_method`),
each declaring a model kind with a trained head, on the preference formatter's [chosen; rejected] rows:

- "token-judge": a token classifier with two labels (a process reward model's shape) that labels every completion
  token of a chosen row 1 and of a rejected row 0 (cross-entropy per token);
- "value-fit": a causal LM with a value head whose value at each row's last token regresses to 1 (chosen) or 0
  (rejected), plus the language-model loss on the chosen completions, so that both the LM and the head train."""

import torch
import torch.nn.functional as F

import alignkit
from alignkit.blocks.lmhead import final_hidden_states


class TokenJudgeConfig(alignkit.MethodConfig):
    name: str = "token-judge"


class ValueFitConfig(alignkit.MethodConfig):
    name: str = "value-fit"


def pair_targets(batch) -> torch.Tensor:
    """1 for the chosen half of the rows, 0 for the rejected half."""
    n = batch["input_ids"].shape[0] // 2
    return torch.cat([torch.ones(n), torch.zeros(n)]).to(batch["input_ids"].device)


class TokenJudgeLoss(alignkit.Loss):
    def counts(self, batch):
        return {"tokens": int((batch["labels"] != -100).sum())}

    def __call__(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        mask = batch["labels"] != -100
        target = pair_targets(batch).long()[:, None].expand_as(mask)
        token_logits, token_target = logits[mask], target[mask]
        right = (token_logits.argmax(-1) == token_target).sum()
        return alignkit.LossOutput(terms={"tokens": F.cross_entropy(token_logits, token_target, reduction="sum")},
                                   metrics={"token_accuracy": (right, int(mask.sum()))})


class ValueFitLoss(alignkit.Loss):
    def counts(self, batch):
        n = batch["input_ids"].shape[0] // 2
        return {"rows": 2 * n, "tokens": int((batch["labels"][:n, 1:] != -100).sum())}

    def __call__(self, model, batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        last = mask.sum(-1) - 1
        values = alignkit.blocks.value_head(model)(out.hidden_states[-1])[torch.arange(len(ids)), last]
        n = ids.shape[0] // 2
        nll = F.cross_entropy(out.logits[:n, :-1].float().flatten(0, 1), labels[:n, 1:].flatten(), reduction="sum")
        target = pair_targets(batch)
        right = ((values > 0.5) == target.bool()).sum()
        return alignkit.LossOutput(terms={"rows": F.mse_loss(values, target, reduction="sum"), "tokens": nll},
                                   metrics={"value_accuracy": (right, len(ids)), "value": (values.detach().sum(),
                                                                                            len(ids))})


def values_at_last_token(model, ids, mask) -> torch.Tensor:
    """What ValueFitLoss reads: the value at each row's last real token (for the tests)."""
    _, hidden = final_hidden_states(model, ids, mask)
    return alignkit.blocks.value_head(model)(hidden)[torch.arange(len(ids)), mask.sum(-1) - 1]


class HeadKindsPlugin:
    @alignkit.hookimpl
    def register_methods(self, register):
        common = dict(formatter="preference", demo_data="sort", demo_defaults={"train.learning_rate": 3e-3})
        register(alignkit.Method(name="token-judge", config=TokenJudgeConfig, loss=TokenJudgeLoss,
                                 description="Token labels (tests).", model_kind="token-classifier", num_labels=2,
                                 **common))
        register(alignkit.Method(name="value-fit", config=ValueFitConfig, loss=ValueFitLoss,
                                 description="Value regression (tests).", model_kind="causal-lm-value-head", **common))
