"""CPO (Xu et al., arXiv 2401.08417): sigmoid loss on summed completion log-probs plus the chosen NLL."""

import torch.nn.functional as F
from pydantic import Field

import alignkit
from alignkit.blocks.logps import LogpsOptions
from alignkit.blocks.pairs import PairLoss, preference_method, reference_free_metrics


class CPOConfig(LogpsOptions):
    name: str = "cpo"
    beta: float = Field(0.1, gt=0, description="Temperature of the preference term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5,
                                   description="Assumed probability that a preference label is flipped.")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the NLL on the chosen completions.")


class CPOLoss(PairLoss):
    """Summed answer log-probs of [chosen; rejected] rows through the shared log-prob path (alignkit.blocks.logps)."""

    def terms(self, s, groups):  # the chosen rows of `groups`, then their rejected rows
        beta, smoothing, m = self.config.beta, self.config.label_smoothing, len(groups)
        margin = s.logps[:m] - s.logps[m:]
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
        return {"pairs": losses.sum(), "chosen_tokens": self.config.cpo_alpha * -s.logps[:m].sum()}

    def metrics(self, s):
        n = len(s.logps) // 2
        return reference_free_metrics(s, s.logps[:n], s.logps[n:], self.config.beta)


register_methods = alignkit.registers(preference_method(
    name="cpo", config=CPOConfig, loss=CPOLoss,
    description="Contrastive Preference Optimization: sigmoid preference loss plus NLL, no reference.",
    citation="@article{xu2024cpo, title={Contrastive Preference Optimization: Pushing the Boundaries of LLM "
             "Performance in Machine Translation}, journal={arXiv:2401.08417}, year={2024}}",
))
