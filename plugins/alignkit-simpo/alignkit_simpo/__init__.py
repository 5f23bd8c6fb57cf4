"""SimPO (Meng et al., arXiv 2405.14734): length-normalised log-probs with a target reward margin."""

import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks.logps import LogpsOptions
from alignkit.blocks.pairs import PairLoss, preference_method, reference_free_metrics


class SimPOConfig(LogpsOptions):
    name: str = "simpo"
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward.")
    simpo_gamma: float = Field(0.5, ge=0, description="Target reward margin gamma.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="Assumed probability that a preference label is flipped.")
    cpo_alpha: float = Field(0.0, ge=0,
                             description="Weight of an NLL on the chosen completions (0: none, as in the paper).")


class SimPOLoss(PairLoss):
    """Mean answer log-probs of [chosen; rejected] rows through the shared log-prob path (alignkit.blocks.logps)."""

    def terms(self, s, groups):  # the chosen rows of `groups`, then their rejected rows
        c, m = self.config, len(groups)
        mean = s.logps / s.tokens
        margin = (mean[:m] - mean[m:]) - c.simpo_gamma / c.beta
        losses = (-F.logsigmoid(c.beta * margin) * (1 - c.label_smoothing)
                  - F.logsigmoid(-c.beta * margin) * c.label_smoothing)
        out = {"pairs": losses.sum()}
        if c.cpo_alpha:
            out["chosen_tokens"] = c.cpo_alpha * -s.logps[:m].sum()
        return out

    def metrics(self, s):  # rewards of the mean log-probs; nll_loss 0 unless the NLL is part of the loss
        n, mean_logps = len(s.logps) // 2, s.logps / s.tokens
        return reference_free_metrics(s, mean_logps[:n], mean_logps[n:], self.config.beta,
                                      nll=bool(self.config.cpo_alpha))


register_methods = alignkit.registers(preference_method(
    name="simpo", config=SimPOConfig, loss=SimPOLoss,
    description="Simple Preference Optimization: length-normalised rewards with a margin, no reference.",
    citation="@article{meng2024simpo, title={SimPO: Simple Preference Optimization with a Reference-Free Reward}, "
             "journal={arXiv:2405.14734}, year={2024}}",
))
