"""TRL 1.16 DPOTrainer's loss types, one small function each: per pair [m] from the pair's log-probs.

Each function reads a `Pair` (policy and reference summed log-probs of the chosen and rejected answers, their
token counts, the f-divergence scores) and the method config, and returns the loss of each pair. `sft` is not
here: it is a token-mean NLL over the chosen answers (its own unit, see the plugin's loss).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Pair:
    chosen: torch.Tensor  # policy log-probs [m]
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # completion tokens per answer [m]
    rejected_tokens: torch.Tensor
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5

    @property
    def chosen_logratio(self):
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self):
        return self.rejected - self.ref_rejected

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """f'(pi / pi_ref) of each answer (f-DPO): the log-ratio for the reverse KL."""
        return F_DIVERGENCES[self.f_divergence](self.chosen_logratio, self.f_alpha), \
            F_DIVERGENCES[self.f_divergence](self.rejected_logratio, self.f_alpha)

    def delta(self) -> torch.Tensor:
        c, r = self.scores()
        return c - r


def _alpha_divergence(logratio, alpha):
    if abs(alpha - 1.0) < 1e-6:  # the limit f'(t) -> log t
        return logratio
    clamp = 11.0 if logratio.dtype == torch.float16 else 80.0
    t = torch.clamp(((alpha - 1.0) * logratio).float(), max=clamp)
    return (torch.exp(t) - 1.0).to(logratio.dtype) / (alpha - 1.0)


F_DIVERGENCES = {
    "reverse_kl": lambda x, _: x,
    "forward_kl": lambda x, _: 1 - torch.exp(-x),
    "js_divergence": lambda x, _: math.log(2) + F.logsigmoid(x),
    "alpha_divergence": _alpha_divergence,
}
#: the loss types built on the chosen - rejected score difference: the only ones with an f-divergence (TRL)
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
#: the loss types that read label_smoothing
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}
#: the loss types that sort the micro-batch's pairs (not a sum of per-pair terms)
SORTED = {"aot", "aot_unpaired"}


def _smoothed_sigmoid(delta, c):
    return -F.logsigmoid(c.beta * delta) * (1 - c.label_smoothing) - F.logsigmoid(-c.beta * delta) * c.label_smoothing


def sigmoid(p, c):
    return -F.logsigmoid(c.beta * p.delta())


def hinge(p, c):
    return torch.relu(1 - c.beta * p.delta())


def _per_token_delta(p):
    cs, rs = p.scores()
    return cs / p.chosen_tokens.clamp(min=1) - rs / p.rejected_tokens.clamp(min=1)


def ipo(p, c):  # averaged over the completion tokens, as TRL (confirmed with the IPO authors)
    return (_per_token_delta(p) - 1 / (2 * c.beta)) ** 2


def exo_pair(p, c):
    z, eps = c.beta * p.delta(), c.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair(p, c):
    rc, rr = c.beta * p.chosen_logratio, c.beta * p.rejected_logratio
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def robust(p, c):
    z, eps = c.beta * p.delta(), c.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def bco_pair(p, c):
    return -F.logsigmoid(c.beta * p.chosen_logratio) - F.logsigmoid(-c.beta * p.rejected_logratio)


def sppo_hard(p, c):
    return (p.chosen_logratio - 0.5 / c.beta) ** 2 + (p.rejected_logratio + 0.5 / c.beta) ** 2


def aot(p, c):
    delta = torch.sort(p.chosen - p.rejected).values - torch.sort(p.ref_chosen - p.ref_rejected).values
    return _smoothed_sigmoid(delta, c)


def aot_unpaired(p, c):
    return _smoothed_sigmoid(torch.sort(p.chosen_logratio).values - torch.sort(p.rejected_logratio).values, c)


def apo_zero(p, c):
    return 1 - torch.sigmoid(c.beta * p.chosen_logratio) + torch.sigmoid(c.beta * p.rejected_logratio)


def apo_down(p, c):
    return torch.sigmoid(c.beta * p.chosen_logratio) + 1 - torch.sigmoid(
        c.beta * (p.chosen_logratio - p.rejected_logratio))


def discopop(p, c):
    z = c.beta * p.delta()
    modulation = torch.sigmoid(z / c.discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def sigmoid_norm(p, c):
    return -F.logsigmoid(c.beta * _per_token_delta(p))


#: loss_type -> per-pair loss; "sft" is the chosen answers' token-mean NLL (the plugin's own term)
LOSSES = {f.__name__: f for f in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                                  aot_unpaired, apo_zero, apo_down, discopop)}
LOSSES["sft"] = None
LOSSES["sigmoid_norm"] = sigmoid_norm
