"""SFT: token NLL (DFT: weighted by its detached probability) per trained token, with accuracy and entropy."""

import torch

from alignkit import Loss, LossOutput
from alignkit.blocks.logps import TokenScorer
from alignkit.formatters.packing import input_tokens, model_inputs, trained_labels, trained_tokens

TERMS = {"nll": lambda lp, _: -lp.sum(), "dft": lambda lp, _: -(lp * lp.detach().exp()).sum()}  # per loss_type


class SFTLoss(Loss):
    running_totals = {"num_tokens": "input_tokens"}  # TRL's num_tokens: the input tokens seen in training so far

    def __init__(self, config) -> None:
        super().__init__(config)
        self.scorer = TokenScorer.from_config(config)

    def prepare_model(self, model: torch.nn.Module) -> None:
        self.head = self.scorer.head_of(model)  # the split-off LM head; None: the plain path

    def counts(self, batch: dict) -> dict[str, int]:
        return {"tokens": trained_tokens(batch, self.config.label_pad_token_id), "input_tokens": input_tokens(batch)}

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        s = self.scorer(model, model_inputs(batch), trained_labels(batch, self.config.label_pad_token_id),
                        term=TERMS[self.config.loss_type], stats=lambda logits, t: (logits.argmax(-1) == t,))
        correct = s.extra[0] if s.extra else torch.zeros(0, dtype=torch.bool)
        n = torch.tensor(float(correct.numel()), device=s.total.device)
        return LossOutput(terms={"tokens": s.total}, metrics={"mean_token_accuracy": (correct.sum().to(n.dtype), n),
                                                              "entropy": (s.entropy.sum(), n)})
