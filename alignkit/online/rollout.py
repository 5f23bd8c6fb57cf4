"""The rollout stage of online methods (`Method(rollout=...)`), as the engine runs it.

Each optimizer step is rollout -> counts -> reference -> loss -> backward per micro-batch. The rollout
(built once as `rollout(method_config, tokenizer)`, plus `rewards=` the reward registry when its
constructor takes that keyword) turns each micro-batch of prompt rows into the batch the other stages
see, without gradient, with `ctx.generator` (alignkit.online.generation) to sample from the current policy.
A rollout may also define `finish(batches, ctx=)`, called once with all of a step's rolled-out
micro-batches (statistics over the whole step, e.g. a batch-wide reward std; at eval, one batch at a time).
A rollout with `iterations = k > 1` is used for k consecutive optimizer steps on the same micro-batches
(k optimisation passes per rollout); checkpoints are then written only between rollouts, so a resumed run
never needs a rollout it did not keep. Evaluation runs the rollout on each eval batch.

The contract is the `Rollout` Protocol below, checked when the method is registered (`check_rollout`).
"""

import inspect
from typing import Protocol, runtime_checkable

import torch

from alignkit.errors import PluginError
from alignkit.online.generation import Generator, backend_for
from alignkit.online.rewards import RewardRegistry
from alignkit.plugin.context import StepContext, call


@runtime_checkable
class Rollout(Protocol):
    """What `Method(rollout=...)` names: a class built once per run as `Rollout(method_config, tokenizer)` (plus
    `rewards=` the RewardRegistry when its constructor takes that keyword), whose instances turn each micro-batch of
    prompt rows into the batch the reference and the loss see, sampling with `ctx.generator`.

    Optional members: `finish(batches, ctx)` (once per step, with all its rolled-out micro-batches),
    `iterations: int` (optimisation passes per rollout, default 1), `generation_backend: str` ("transformers" or
    "vllm"), `max_staleness: int` (default 0: sample each step's rollout when the step starts; k > 0: the rollouts
    of the next k steps are sampled in a worker thread by a copy of the policy while the current step trains, so a
    rollout is up to k optimizer steps old; `__call__` then runs in that thread and may not call `ctx.reduce`, and
    `ctx.generator.model` is the copy that samples: see alignkit.engine.ahead)."""

    def __call__(self, batch: dict, ctx: StepContext) -> dict: ...


def check_rollout(rollout, where: str) -> None:
    """A PluginError (one line starting with `where`) unless `rollout` is a class that follows the Protocol."""
    if not isinstance(rollout, type):
        raise PluginError(f"{where}: rollout is an instance of {type(rollout).__name__}, not a class; give the class "
                          "(the engine builds it once as NAME(config, tokenizer))")
    name = rollout.__name__
    if not issubclass(rollout, Rollout):
        raise PluginError(f"{where}: rollout {name}: its instances are not callable as rollout(batch, ctx); define "
                          "__call__(self, batch, ctx) -> dict")
    for what, fn, args in (("NAME(config, tokenizer)", rollout, (None, None)),
                           ("__call__ takes no (batch, ctx)", rollout.__call__, (None, None, None))):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        try:
            signature.bind(*args)
        except TypeError:
            if fn is rollout:
                raise PluginError(f"{where}: rollout {name} cannot be built as {what} ({signature}); its constructor "
                                  "takes the method config and the tokenizer (and optionally rewards=)") from None
            raise PluginError(f"{where}: rollout {name}.{what} ({signature}); define __call__(self, batch, ctx) "
                              "-> dict") from None
    finish = inspect.getattr_static(rollout, "finish", None)
    if finish is not None and not callable(finish):
        raise PluginError(f"{where}: rollout {name}.finish is {type(finish).__name__}, not a method "
                          "finish(self, batches, ctx)")


def build_rollout(method, config, tokenizer, pm):
    """The method's rollout object, or None for a method without one."""
    if method.rollout is None:
        return None
    kwargs = {}
    if "rewards" in inspect.signature(method.rollout).parameters:
        kwargs["rewards"] = RewardRegistry.from_plugins(pm, getattr(config, "rewards", None))
    return method.rollout(config.method, tokenizer, **kwargs)


class RolloutStage:
    """Runs the rollout on a step's micro-batches and keeps it for its remaining optimisation passes."""

    def __init__(self, rollout) -> None:
        self.rollout = rollout
        self.iterations = int(getattr(rollout, "iterations", 1))
        self.max_staleness = int(getattr(rollout, "max_staleness", 0))
        self.generator: Generator | None = None
        self.ahead = None  # the engine's async rollouts (alignkit.engine.ahead) when max_staleness > 0
        self._kept: tuple[list, list] | None = None  # (prompt micro-batches, their rollout)
        self._passes_left = 0

    def attach(self, model, accelerator, tokenizer, seed: int, models: dict | None = None,
               settings=None) -> Generator:
        """The generation handle for `model` (the prepared policy); StepContext.generator from now on. The backend:
        the run's `generation` block (`settings`), or vllm when the rollout's `generation_backend` attribute says so.
        `models`: the run's other models by name, as (model, adapters_off), sampleable with `generate(model=name)`."""
        backend = getattr(self.rollout, "generation_backend", "transformers")
        self.generator = Generator(model, accelerator, tokenizer, seed,
                                   backend_for(backend, model, accelerator, tokenizer, settings))
        for name, (other, adapters_off) in (models or {}).items():
            self.generator.add_model(name, other, adapters_off)
        return self.generator

    def __call__(self, batches: list, ctxs: list) -> list:
        """The batches the loss sees: a fresh rollout, or the kept one while it has passes left."""
        if self._kept is not None and self._kept[0] is batches and self._passes_left > 0:
            self._passes_left -= 1
            return self._kept[1]
        with torch.no_grad():
            if self.ahead is not None:  # sampled ahead in a worker thread; its step-wide stage runs here
                rolled = self._finish(self.ahead.take(ctxs[0].step), ctxs[0])
            else:
                rolled = self._finish([call(self.rollout, batch, ctx=ctx) for batch, ctx in zip(batches, ctxs)],
                                      ctxs[0])
        self._kept, self._passes_left = (batches, rolled), self.iterations - 1
        return rolled

    def evaluate(self, batch, ctx):
        with torch.no_grad():
            return self._finish([call(self.rollout, batch, ctx=ctx)], ctx)[0]

    def _finish(self, rolled: list, ctx) -> list:
        """The rollout's optional step-wide stage: `finish(batches, ctx=)` sees every micro-batch at once."""
        finish = getattr(self.rollout, "finish", None)
        return rolled if finish is None else call(finish, rolled, ctx=ctx)

    def windows(self, windows):
        """Each step's micro-batches, yielded once per optimisation pass."""
        for micro_batches in windows:
            for _ in range(self.iterations):
                yield micro_batches

    @property
    def between_rollouts(self) -> bool:
        """No kept rollout waits for another pass: a checkpoint here resumes exactly."""
        return self._passes_left == 0

    def after_step(self) -> None:
        """After each optimizer step: a backend with its own copy of the weights gets the new ones."""
        if self.generator is not None:
            self.generator.sync_weights()
