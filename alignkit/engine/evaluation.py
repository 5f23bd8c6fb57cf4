"""Evaluation: the loss and metrics of a model over the eval set, reduced exactly over batches and processes.

eval_loss is each loss term summed over the whole eval set divided by the total count of its unit (exact,
independent of the eval batch size), or, for a loss with `eval_loss_per_batch`, the mean of per-batch
normalised losses (TRL's way). Metrics are (sum, count) totals over all batches of all processes; a plain
tensor metric counts one per batch (the mean of per-batch means).
"""

from collections.abc import Callable

import torch

from alignkit.engine.metrics import MetricSums, means, reduce_totals
from alignkit.plugin.context import StepContext, call


class EvalStopped(Exception):
    """A stop request (SIGINT/SIGTERM) ended the evaluation early: its partial result is not reported."""


def evaluate_batches(model, batches, loss, run_loss: Callable, context: Callable[[int, int], StepContext],
                     accelerator, rollout: Callable | None = None,
                     stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """`eval_`-prefixed metrics of `model` over `batches` (this process's share; every process calls this).

    `run_loss(model, batch, ctx)` runs the loss (with its reference) on one batch; `context(index, count)`
    makes each batch's StepContext; `rollout(batch, ctx)`, if given, turns each batch into the one the loss
    sees first (online methods). `stop()` true before a batch ends the loop there: every process still
    reduces once (no collective is left waiting), then EvalStopped is raised."""
    was_training = model.training
    model.eval()
    metrics, terms = MetricSums(accelerator.device), MetricSums(accelerator.device)
    stopped = False
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if stop is not None and stop():
                stopped = True
                break
            ctx = context(index, len(batches))
            batch = rollout(batch, ctx) if rollout is not None else batch
            counts = {u: float(c) for u, c in call(loss.counts, batch, ctx=ctx).items()}
            with accelerator.autocast():
                out = run_loss(model, batch, ctx)
            if loss.eval_loss_per_batch:
                metrics.add({"loss": out.normalized(counts), **out.metrics})
            else:
                metrics.add(out.metrics)
                terms.add({unit: (term, counts[unit]) for unit, term in out.terms.items()})
    model.train(was_training)
    result = means(reduce_totals(metrics.totals(), accelerator))
    if not loss.eval_loss_per_batch:
        unit_totals = reduce_totals(terms.totals(), accelerator)
        result["loss"] = sum(s / c if c else 0.0 for s, c in unit_totals.values())
    if stopped:
        raise EvalStopped
    return {f"eval_{k}": result[k] for k in sorted(result)}
