"""Async rollouts with bounded staleness: the rollouts of the next `depth` steps are sampled in a worker thread,
by a copy of the policy, while the current step trains (a rollout's `max_staleness`; 0, the default, is the
synchronous stage).

The rollout of step j + depth is requested when step j starts training, with the policy's weights of that moment
(W_j), and trained at step j + depth: it is at most `depth` optimizer steps old (the first steps: fewer). With
`iterations = k` passes per rollout, depth counts rollouts: the rollout first trained at step j + depth * k is
requested as step j (a first pass) starts, and trained k times from there. Its
completions depend on (W_j, the seeds), never on timing, so a run is reproducible for a given depth. The rollouts
requested but not yet trained at a checkpoint are saved in it (one file per process) and taken back on resume:
a resumed run trains on exactly what the uninterrupted one did.

The worker thread runs only the rollout's `__call__` (sampling and scoring: no collective, so `ctx.reduce` is
not available there); `finish` runs when the step that trains the rollout starts, in the training thread.
"""

import copy
import io
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.errors import ConfigError
from alignkit.online.generation import POLICY, Generator
from alignkit.plugin.context import StepContext, call

FILE = "rollouts-ahead-{rank}.pt"


class _Identity:
    @staticmethod
    def unwrap_model(model):
        return model


def _no_collectives(tensor, op):
    raise RuntimeError("ctx.reduce is not available in a rollout's __call__ with max_staleness > 0 (it runs in a "
                       "worker thread); reduce across processes in finish(batches, ctx)")


@dataclass
class _Counters:
    """The data position a lookahead iterator advances instead of the run's own state."""

    step: int
    max_steps: int
    epoch_index: int
    batches_in_epoch: int


class RolloutsAhead:
    def __init__(self, stage, depth: int, policy: torch.nn.Module, accelerator, tokenizer, seed: int) -> None:
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ConfigError(f"method.max_staleness={depth}: async rollouts keep a full copy of the policy in each "
                              f"process, which {accelerator.distributed_type.value} shards; use max_staleness=0")
        if not hasattr(stage.generator.backend, "max_batch_rows"):  # the transformers backend
            raise ConfigError(f"method.max_staleness={depth}: async rollouts sample a copy of the policy with "
                              "transformers' generate; use generation_backend=transformers or max_staleness=0")
        self.stage, self.depth, self.accelerator = stage, depth, accelerator
        unwrapped = accelerator.unwrap_model(policy)
        self.trained = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
        self.sampler = copy.deepcopy(unwrapped).eval().requires_grad_(False)
        sampler_params = dict(self.sampler.named_parameters())
        self.copies = [sampler_params[n] for n, _ in self.trained]
        self.generator = Generator(self.sampler, _Identity(), tokenizer, seed)
        for name, backend in stage.generator.backends.items():  # the reference or teacher: sampled as they are
            if name != POLICY:
                self.generator.backends[name] = backend
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-rollout")
        self.pending: dict[int, Future] = {}

    # ---- the data, looked ahead -------------------------------------------------------------------------

    def windows(self, step_batches, train_dl, state, contexts):
        """The run's step windows (as `step_batches(train_dl, state)` yields them), each with the rollouts of the
        next `depth` windows requested; the run's data position (state) is that of the window being yielded."""
        shadow = _Counters(state.step, state.max_steps, state.epoch_index, state.batches_in_epoch)
        source, queue = step_batches(train_dl, shadow), deque()

        def pull() -> None:
            window = next(source, None)
            if window is not None:
                queue.append((shadow.step, window, shadow.epoch_index, shadow.batches_in_epoch))
                shadow.step += self.stage.iterations  # the optimizer step of the window's first pass

        for _ in range(self.depth):
            pull()
        while queue:
            step, window, state.epoch_index, state.batches_in_epoch = queue.popleft()
            if step not in self.pending:  # the first window of a run (or one a resume did not keep)
                self._request(step, window, contexts)
            pull()
            for later, upcoming, _, _ in queue:
                if later not in self.pending:
                    self._request(later, upcoming, contexts)
            yield window

    def _request(self, step: int, window: list, contexts) -> None:
        snapshot = [p.detach().clone() for _, p in self.trained]  # the policy's weights now
        ctxs = [StepContext(True, step, i, len(window), c.num_processes, c.process_index, c.device, self.generator,
                            _no_collectives) for i, c in enumerate(contexts(len(window)))]
        self.pending[step] = self.pool.submit(self._roll, snapshot, window, ctxs)

    def _roll(self, snapshot: list, window: list, ctxs: list) -> list:
        with torch.no_grad():
            for copy_, value in zip(self.copies, snapshot):
                copy_.copy_(value)
            return [call(self.stage.rollout, batch, ctx=ctx) for batch, ctx in zip(window, ctxs)]

    def take(self, step: int) -> list:
        """The rolled-out micro-batches of `step` (waiting for the worker; its error is raised here)."""
        return self.pending.pop(step).result()

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def saved(self) -> dict[str, bytes]:
        """This process's requested, not yet trained rollouts, for the checkpoint."""
        done = {step: future.result() for step, future in sorted(self.pending.items())}
        buffer = io.BytesIO()
        torch.save({"depth": self.depth, "rollouts": done}, buffer)
        return {FILE.format(rank=self.accelerator.process_index): buffer.getvalue()}

    def restore(self, checkpoint: Path) -> None:
        """The rollouts a checkpoint kept, as if just requested (a checkpoint of another depth keeps none that
        this run can use: they are sampled again)."""
        path = Path(checkpoint) / FILE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            return
        kept = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        if kept.get("depth") != self.depth:
            return
        for step, rolled in kept["rollouts"].items():
            future = Future()
            future.set_result(rolled)
            self.pending[int(step)] = future

    def wait(self) -> None:
        """Every requested rollout finished (before an evaluation, which samples the policy meanwhile)."""
        for future in list(self.pending.values()):
            future.exception()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
