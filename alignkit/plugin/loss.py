"""The Loss interface and the log-probability helpers that losses share.

A loss runs the policy on a micro-batch and returns *summed* loss terms, each keyed by the unit
that normalises it ("tokens", "pairs", ...). The engine divides each sum by the count of that unit
over the whole accumulation window and all processes (from `counts`), so the gradient does not
depend on how a global batch is split into micro-batches or ranks.

`__call__`, `reference` and `counts` may declare a keyword parameter `ctx`: the engine then passes an
`alignkit.StepContext` (training or eval, step, micro-batch, processes, `ctx.reduce` across processes).
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

#: a logged metric: a 0-d tensor (the micro-batch's mean) or a pair (sum, count) of tensors or numbers
Metric = torch.Tensor | tuple[Any, Any]


@dataclass
class LossOutput:
    """`terms`: unit -> summed loss over the micro-batch. `metrics`: name -> what is logged.

    A metric is either a 0-d tensor, the micro-batch's mean (averaged over micro-batches, then processes,
    as TRL does), or a pair `(sum, count)`: the engine adds sums and counts over micro-batches, processes,
    logging windows and eval batches and logs sum / count, the exact mean whatever the batching. A pair
    metric may be left out of a micro-batch that has nothing to count.
    """

    terms: dict[str, torch.Tensor]
    metrics: dict[str, Metric] = field(default_factory=dict)

    def normalized(self, totals: dict[str, float]) -> torch.Tensor:
        """The loss: each term divided by its unit's total count (at least 1, as TRL's clamp(min=1): a step whose
        every token is masked, e.g. all completions truncated with mask_truncated_completions, has loss 0)."""
        return sum(term / max(totals[unit], 1) for unit, term in self.terms.items())


class Loss(ABC):
    """A method's objective. Built once per run as `loss(config)`."""

    #: capability the engine reads: the loss wants a frozen reference model. The engine then passes
    #: `ref=` (what `reference` returned for the same batch) to `__call__`.
    needs_reference_model: bool = False
    #: with a reference model: compute `reference` once over the dataset before training
    precompute_reference: bool = False
    #: with a reference model: (k, alpha) moves the reference toward the policy every k optimizer steps,
    #: reference <- alpha * policy + (1 - alpha) * reference (a trust-region reference; TRL's
    #: SyncRefModelCallback); None: frozen.
    #: The reference is then a trained state: it is saved in each checkpoint and restored on resume.
    reference_sync: tuple[int, float] | None = None
    #: eval_loss as the mean of per-batch normalised losses (TRL's way; depends on the eval batch size).
    #: False: each term summed over the whole eval set / the total count of its unit (exact).
    eval_loss_per_batch: bool = False
    #: the loss calls `ctx.reduce` (a collective): evaluation then keeps every process in lock-step
    #: (each runs the same number of eval batches; the last batches may repeat a few examples to even them out)
    collective: bool = False
    #: running totals to log: metric name -> a unit of `counts`. The engine logs that unit's count summed over
    #: every training step so far (all processes, kept across resume) in each train log, and as `eval_<name>`
    #: at each evaluation (0 before any training), e.g. {"num_tokens": "input_tokens"} for TRL's num_tokens.
    running_totals: Mapping[str, str] = {}

    def __init__(self, config: Any) -> None:
        self.config = config

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Called once with the unwrapped policy before training or evaluation: adjust it (e.g. disable
        dropout) or read what the loss needs from it. `__call__` may get a distributed wrapper instead."""

    def prepare_reference(self, ref_model: torch.nn.Module, policy: torch.nn.Module) -> None:
        """Called once with a reference model the engine loaded (`model.ref_name_or_path`, or a frozen copy of the
        policy) and the unwrapped policy, before any data is formatted or anything written: check that the two fit
        together (raise alignkit.ConfigError naming model.ref_name_or_path, e.g. for another vocabulary) or read
        what the loss needs from the reference. Not called for a LoRA policy whose reference is itself with its
        adapters disabled."""

    @abstractmethod
    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """How many of each normalising unit this micro-batch holds, from the batch alone (may take `ctx`)."""

    @abstractmethod
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> LossOutput:
        """Run the model on the batch and return the summed terms and the metrics (`ref=` with a reference;
        `ctx=` when declared)."""

    def after_step(self, totals: dict[str, tuple[float, float]], ctx) -> dict[str, tuple[float, float]] | None:
        """Called on every process after each training optimizer step that changed the weights, with this process's
        metric (sum, count) totals over the step's micro-batches and the step's context (`ctx.reduce` sums over the
        processes; every process calls it). A loss with a controller that moves between steps (e.g. an adaptive
        coefficient) updates it here, keeps it in `state_dict`, and may return extra (sum, count) metrics for
        this step's log."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the loss keeps across steps (JSON values), saved in each checkpoint and given back to
        `load_state_dict` on resume, so a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (called on resume, before the first step)."""

    def reference(self, ref_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the loss needs from the reference model, as per-example tensors [B] (called without grad;
        may take `ctx`)."""
        raise NotImplementedError(f"{type(self).__name__} declares needs_reference_model but has no reference()")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def shifted_token_logps(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (at least float32) of each label and the mask of positions that count.

    Decoder-only models predict the next token (shift=True: [B, T-1]); an encoder-decoder's decoder
    logits already line up with their labels (shift=False: [B, T]).
    """
    if shift:
        logits_BTV, labels_BT = logits_BTV[:, :-1], labels_BT[:, 1:]
    mask_BT = labels_BT != ignore_index
    logps_BTV = F.log_softmax(at_least_fp32(logits_BTV), dim=-1)
    safe_labels = labels_BT.masked_fill(~mask_BT, 0)
    logps_BT = logps_BTV.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logps_BT * mask_BT, mask_BT


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable (at least float32) over the whole range, finite at x == 0."""
    # Above -1e-7 float32 exp(x) rounds to 1 (the reference implementation gives -inf there) and the
    # gradient ~1/|x| would overflow: clamp, so value and gradient stay finite for every x <= 0.
    x = at_least_fp32(x).clamp(max=-1e-7)
    near_zero = x > -0.6931471805599453
    # Each branch sees only inputs safe for it: torch.where back-propagates through both branches.
    expm1_branch = torch.log(-torch.expm1(torch.where(near_zero, x, -1.0)))
    log1p_branch = torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x)))
    return torch.where(near_zero, expm1_branch, log1p_branch)
