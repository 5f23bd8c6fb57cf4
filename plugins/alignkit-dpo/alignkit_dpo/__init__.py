"""DPO (Rafailov et al., arXiv 2305.18290): the sigmoid loss against a frozen reference model."""

import torch
import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit.blocks.logps import LogpsOptions, SequenceScorer


class DPOConfig(LogpsOptions):
    name: str = "dpo"
    beta: float = Field(0.1, gt=0, description="Temperature of the implicit reward (deviation from the reference).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed probability that a preference label is flipped (cDPO).")
    precompute_ref_log_probs: bool = Field(False, description="Compute the reference log-probs once before training.")


def sigmoid_losses(logits, beta, smoothing):
    return -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing


class DPOLoss(alignkit.Loss):
    """Summed answer log-probs of [chosen; rejected] rows through the shared log-prob path (alignkit.blocks.logps)."""

    eval_loss_per_batch = True  # eval_loss: the mean of per-batch losses, as TRL computes it
    needs_reference_model = True

    def __init__(self, config):
        super().__init__(config)
        self.scorer = SequenceScorer.from_config(config)

    @property
    def precompute_reference(self):
        return self.config.precompute_ref_log_probs

    def prepare_model(self, model):
        self.scorer.prepare(model)

    def counts(self, batch):
        return {"pairs": batch["input_ids"].shape[0] // 2}

    def reference(self, ref_model, batch):
        s, _, _ = self.scorer(ref_model, batch)
        n = len(s.logps) // 2
        return {"chosen": s.logps[:n], "rejected": s.logps[n:]}

    def __call__(self, model, batch, ref):
        beta, smoothing = self.config.beta, self.config.label_smoothing

        def terms(s, groups):  # the chosen rows of `groups`, then their rejected rows
            m = len(groups)
            logits = (s.logps[:m] - s.logps[m:]) - (ref["chosen"][groups] - ref["rejected"][groups])
            return {"pairs": sigmoid_losses(logits, beta, smoothing).sum()}

        s, _, summed = self.scorer(model, batch, terms=terms, group_size=2)
        n = len(s.logps) // 2
        with torch.no_grad():
            chosen, rejected = s.logps[:n], s.logps[n:]
            chosen_rewards, rejected_rewards = beta * (chosen - ref["chosen"]), beta * (rejected - ref["rejected"])
            metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                       "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen.dtype).mean(),
                       "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                       "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
        return alignkit.LossOutput(terms=summed, metrics=metrics)


#: the demo (tiny built-in model, the core's built-in sorting pairs): one epoch at a high learning rate
DEMO_DEFAULTS = demo_defaults()


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(name="dpo", config=DPOConfig, formatter="preference", loss=DPOLoss,
                             description="Direct Preference Optimization: sigmoid loss against a frozen reference.",
                             defaults={"train.learning_rate": 1e-6},
                             demo_data="sort", demo_defaults=DEMO_DEFAULTS, progress_metrics=("rewards/accuracies",),
                             citation="@article{rafailov2023dpo, title={Direct Preference Optimization: Your Language "
                                      "Model is Secretly a Reward Model}, journal={arXiv:2305.18290}, year={2023}}"))
