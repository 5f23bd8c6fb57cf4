"""DPO (Rafailov et al., arXiv 2305.18290): the sigmoid loss against a frozen reference model, on the summed answer
log-probs of [chosen; rejected] rows through the shared log-prob path (alignkit.blocks.logps)."""

import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit.blocks.logps import LogpsOptions, SequenceScorer, pair_metrics


class DPOConfig(LogpsOptions):
    name: str = "dpo"
    beta: float = Field(0.1, gt=0, description="Temperature of the implicit reward (deviation from the reference).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="Assumed probability that a preference label is flipped (cDPO).")
    precompute_ref_log_probs: bool = Field(False, description="Compute the reference log-probs once before training.")


class DPOLoss(alignkit.Loss):
    eval_loss_per_batch = True  # eval_loss: the mean of per-batch losses, as TRL computes it
    needs_reference_model = True

    def __init__(self, config):
        super().__init__(config)
        self.scorer = SequenceScorer.from_config(config)
        self.precompute_reference = config.precompute_ref_log_probs

    def prepare_model(self, model):
        self.scorer.prepare(model)

    def counts(self, batch):
        return {"pairs": batch["input_ids"].shape[0] // 2}

    def reference(self, ref_model, batch):
        return dict(zip(("chosen", "rejected"), self.scorer(ref_model, batch)[0].logps.chunk(2)))

    def __call__(self, model, batch, ref):
        beta, smoothing = self.config.beta, self.config.label_smoothing

        def terms(s, groups):  # the chosen rows of `groups`, then their rejected rows
            m = len(groups)
            logits = beta * ((s.logps[:m] - s.logps[m:]) - (ref["chosen"][groups] - ref["rejected"][groups]))
            return {"pairs": -(F.logsigmoid(logits) * (1 - smoothing) + F.logsigmoid(-logits) * smoothing).sum()}

        s, _, summed = self.scorer(model, batch, terms=terms, group_size=2)
        chosen, rejected = s.logps.chunk(2)
        metrics = pair_metrics(beta * (chosen - ref["chosen"]), beta * (rejected - ref["rejected"]), chosen, rejected)
        return alignkit.LossOutput(terms=summed, metrics=metrics)


register_methods = alignkit.registers(alignkit.Method(
    name="dpo", config=DPOConfig, formatter="preference", loss=DPOLoss, defaults={"train.learning_rate": 1e-6},
    description="Direct Preference Optimization: sigmoid loss against a frozen reference.", demo_data="sort",
    demo_defaults=demo_defaults(), progress_metrics=("rewards/accuracies",),
    citation="@article{rafailov2023dpo, title={Direct Preference Optimization: Your Language Model is Secretly a "
             "Reward Model}, journal={arXiv:2305.18290}, year={2023}}",
))
