"""A test method whose reference outputs are per-token tensors of varying length (importable as
`per_token_reference_method`): the reference's log-prob of each label, [B, T-1], zero at padding. The loss pulls the
policy's per-token log-probs towards the reference's; `method.precompute` chooses precomputed or live outputs."""

import torch

import alignkit
from toy_method import ToyConfig, ToyFormatter, toy_rows


class PerTokenConfig(ToyConfig):
    name: str = "per-token-ref"
    precompute: bool = False


def token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logps * mask, mask


class PerTokenLoss(alignkit.Loss):
    needs_reference_model = True

    @property
    def precompute_reference(self):
        return self.config.precompute

    def counts(self, batch):
        return {"tokens": int((batch["labels"][:, 1:] != -100).sum())}

    def reference(self, ref_model, batch):
        logps, _ = token_logps(ref_model, batch)
        return {"token_logps": logps, "row_sum": logps.sum(-1)}

    def __call__(self, model, batch, ref=None, **kwargs):
        logps, mask = token_logps(model, batch)
        ref_logps = ref["token_logps"].to(logps.dtype)
        assert ref_logps.shape == logps.shape, (ref_logps.shape, logps.shape)
        gap = (logps - ref_logps) * mask
        loss = -logps.sum() + 10.0 * (gap + 0.1 * logps).pow(2).sum()
        return alignkit.LossOutput(terms={"tokens": loss},
                                   metrics={"ref_sum": (ref["row_sum"].sum(), len(ref["row_sum"]))})


class Plugin:
    @alignkit.hookimpl
    def register_methods(self, register):
        register(alignkit.Method(name="per-token-ref", config=PerTokenConfig, formatter=ToyFormatter,
                                 loss=PerTokenLoss, description="Per-token precomputed reference (tests)."))

    @alignkit.hookimpl
    def register_datasets(self, register):
        import datasets

        register("toy-sort", lambda split: datasets.Dataset.from_list(toy_rows(split)))
