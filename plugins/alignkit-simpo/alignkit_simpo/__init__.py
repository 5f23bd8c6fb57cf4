"""SimPO (Meng et al., arXiv 2405.14734): length-normalised log-probs with a target reward margin."""

import torch
import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit.blocks.logps import LogpsOptions, SequenceScorer, count_weights


class SimPOConfig(LogpsOptions):
    name: str = "simpo"
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward.")
    simpo_gamma: float = Field(0.5, ge=0, description="Target reward margin gamma.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="Assumed probability that a preference label is flipped.")
    cpo_alpha: float = Field(0.0, ge=0,
                             description="Weight of an NLL on the chosen completions (0: none, as in the paper).")


class SimPOLoss(alignkit.Loss):
    """Mean answer log-probs of [chosen; rejected] rows through the shared log-prob path (alignkit.blocks.logps)."""

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
        c = self.config

        def terms(s, groups):  # the chosen rows of `groups`, then their rejected rows
            m = len(groups)
            mean = s.logps / s.tokens
            margin = (mean[:m] - mean[m:]) - c.simpo_gamma / c.beta
            losses = (-F.logsigmoid(c.beta * margin) * (1 - c.label_smoothing)
                      - F.logsigmoid(-c.beta * margin) * c.label_smoothing)
            out = {"pairs": losses.sum()}
            if c.cpo_alpha:
                out["chosen_tokens"] = c.cpo_alpha * -s.logps[:m].sum()
            return out

        s, _, summed = self.scorer(model, batch, terms=terms, group_size=2,
                                   weights=count_weights(self.counts(batch), ctx))
        n = len(s.logps) // 2
        with torch.no_grad():
            mean_logps = s.logps / s.tokens
            chosen, rejected = mean_logps[:n], mean_logps[n:]
            index = torch.arange(2 * n, device=chosen.device)
            nll_sum = -s.logps[:n].sum()
            metrics = {"rewards/chosen": c.beta * chosen.mean(), "rewards/rejected": c.beta * rejected.mean(),
                       "rewards/accuracies": (chosen > rejected).to(mean_logps.dtype).mean(),
                       "rewards/margins": c.beta * (chosen - rejected).mean(), "logps/chosen": chosen.mean(),
                       "logps/rejected": rejected.mean(), "logits/chosen": s.rows(index[:n]).logits_mean(True),
                       "logits/rejected": s.rows(index[n:]).logits_mean(True),
                       # as TRL logs it: 0 when the NLL is not part of the loss
                       "nll_loss": nll_sum / s.tokens[:n].sum() if c.cpo_alpha else nll_sum * 0}
        return alignkit.LossOutput(terms=summed, metrics=metrics)


#: the demo (tiny built-in model, the core's built-in sorting pairs): one epoch at a high learning rate
DEMO_DEFAULTS = demo_defaults()


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(name="simpo", config=SimPOConfig, formatter="preference", loss=SimPOLoss,
                             description="Simple Preference Optimization: length-normalised rewards with a margin, no "
                             "reference.",
                             defaults={"train.learning_rate": 1e-6},
                             demo_data="sort", demo_defaults=DEMO_DEFAULTS, progress_metrics=("rewards/accuracies",),
                             citation="@article{meng2024simpo, title={SimPO: Simple Preference Optimization with a "
                                      "Reference-Free Reward}, journal={arXiv:2405.14734}, year={2024}}"))
