"""CPO (Xu et al., arXiv 2401.08417): sigmoid loss on summed completion log-probs plus the chosen NLL."""

import torch
import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit.blocks.logps import LogpsOptions, SequenceScorer, count_weights


class CPOConfig(LogpsOptions):
    name: str = "cpo"
    beta: float = Field(0.1, gt=0, description="Temperature of the preference term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="Assumed probability that a preference label is flipped.")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the NLL on the chosen completions.")


class CPOLoss(alignkit.Loss):
    """Summed answer log-probs of [chosen; rejected] rows through the shared log-prob path (alignkit.blocks.logps)."""

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
        beta, smoothing, alpha = self.config.beta, self.config.label_smoothing, self.config.cpo_alpha

        def terms(s, groups):  # the chosen rows of `groups`, then their rejected rows
            m = len(groups)
            margin = s.logps[:m] - s.logps[m:]
            losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
            return {"pairs": losses.sum(), "chosen_tokens": alpha * -s.logps[:m].sum()}

        s, _, summed = self.scorer(model, batch, terms=terms, group_size=2,
                                   weights=count_weights(self.counts(batch), ctx))
        n = len(s.logps) // 2
        with torch.no_grad():
            chosen, rejected = s.logps[:n], s.logps[n:]
            index = torch.arange(2 * n, device=chosen.device)
            metrics = {"rewards/chosen": beta * chosen.mean(), "rewards/rejected": beta * rejected.mean(),
                       "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
                       "rewards/margins": beta * (chosen - rejected).mean(), "logps/chosen": chosen.mean(),
                       "logps/rejected": rejected.mean(), "logits/chosen": s.rows(index[:n]).logits_mean(True),
                       "logits/rejected": s.rows(index[n:]).logits_mean(True),
                       "nll_loss": -chosen.sum() / s.tokens[:n].sum()}
        return alignkit.LossOutput(terms=summed, metrics=metrics)


#: the demo (tiny built-in model, the core's built-in sorting pairs): one epoch at a high learning rate
DEMO_DEFAULTS = demo_defaults()


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(name="cpo", config=CPOConfig, formatter="preference", loss=CPOLoss,
                             description="Contrastive Preference Optimization: sigmoid preference loss plus NLL, no "
                             "reference.",
                             defaults={"train.learning_rate": 1e-6},
                             demo_data="sort", demo_defaults=DEMO_DEFAULTS, progress_metrics=("rewards/accuracies",),
                             citation="@article{xu2024cpo, title={Contrastive Preference Optimization: Pushing the "
                                      "Boundaries of LLM Performance in Machine Translation}, "
                                      "journal={arXiv:2401.08417}, year={2024}}"))
