"""The step context: what the engine tells a loss (and its reference and rollout stages) about the call.

A loss's `__call__`, `reference` and `counts` (and a method's rollout) receive it as the keyword `ctx`
only if they declare a parameter named `ctx`, so a loss written without it keeps working unchanged.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepContext:
    """Where a call happens: training or eval, which step and micro-batch, which process.

    `step` counts the optimizer steps completed before this call (0 during the first step; at eval, the
    step evaluated at). `micro_batch` is this micro-batch's index among the step's `micro_batches` (at
    eval: the eval batch's index among this process's eval batches). `generator` is the engine's
    generation handle for online methods (None unless the method has a rollout).
    """

    training: bool
    step: int
    micro_batch: int
    micro_batches: int
    num_processes: int = 1
    process_index: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: Any = None
    _reduce: Callable | None = field(default=None, repr=False)
    #: training: unit -> the count over the step's micro-batches and processes that the engine divides each
    #: summed loss term by (set once counts are known, before the loss runs); None elsewhere
    totals: dict[str, float] | None = None

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed (op="sum") or averaged (op="mean") over all processes, without gradient; every
        process must call it, in the same order (a loss that calls it sets `Loss.collective = True`)."""
        if op not in ("sum", "mean"):
            raise ValueError(f"StepContext.reduce: op must be 'sum' or 'mean', got {op!r}")
        tensor = tensor.detach().clone()
        if self.num_processes == 1 or self._reduce is None:
            return tensor
        return self._reduce(tensor.to(self.device), op)


@functools.lru_cache(maxsize=256)
def _takes_ctx(fn: Callable) -> bool:
    try:
        return "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C function without a signature
        return False


def takes_ctx(fn: Callable) -> bool:
    """Whether `fn` declares a parameter named `ctx` (looked up once per function, method or class)."""
    if inspect.ismethod(fn):
        fn = fn.__func__
    elif not (inspect.isfunction(fn) or isinstance(fn, type)):
        fn = type(fn).__call__  # a callable object, e.g. a Loss
    return _takes_ctx(fn)


def call(fn: Callable, *args, ctx: StepContext | None = None, **kwargs):
    """`fn(*args, **kwargs)`, plus `ctx=ctx` when `fn` declares a `ctx` parameter."""
    if ctx is not None and takes_ctx(fn):
        kwargs["ctx"] = ctx
    return fn(*args, **kwargs)
