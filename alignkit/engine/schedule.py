"""When the training loop logs, evaluates, writes checkpoints, stops, and what it does at the end.

The engine asks a Schedule at four moments (before the first step, after every optimizer step, after
the last step of each epoch, after the loop) and does what the returned Actions say. The default
Schedule follows the `train.*` keys with alignkit's conventions: a log row at the last step, an
evaluation at the end unless one just ran, the final model saved in output_dir. A Python API user may
pass another Schedule to the engine, e.g. one that follows transformers.Trainer's strategies, or
stops early; it sees the run's state (step, max_steps, epoch) and keeps its own.
"""

from dataclasses import dataclass


@dataclass
class Actions:
    """What the loop does now: write a log row, evaluate, write a checkpoint, stop (after this step), and,
    at the end only, save the model in output_dir."""

    log: bool = False
    evaluate: bool = False
    checkpoint: bool = False
    stop: bool = False
    save_model: bool = False


class Schedule:
    """alignkit's default schedule from the run's `train` config."""

    def __init__(self, train) -> None:
        self.train = train
        self._last = Actions()

    def at_start(self, run) -> Actions:
        """Before the first step (not again when resuming past it)."""
        return Actions(evaluate=self.train.eval_on_start and run.step == 0)

    def after_step(self, run) -> Actions:
        t, step = self.train, run.step
        last = step >= run.max_steps
        self._last = Actions(
            log=step % t.logging_steps == 0 or last or (t.logging_first_step and step == 1),
            evaluate=bool(t.eval_steps) and step % t.eval_steps == 0,
            checkpoint=bool(t.save_steps) and step % t.save_steps == 0 and not last,  # the final model is saved anyway
        )
        return self._last

    def after_epoch(self, run) -> Actions:
        """After the step that ends an epoch (and after `after_step` for that step)."""
        return Actions()

    def at_end(self, run) -> Actions:
        """After the loop: evaluate unless the last step just did, save the model."""
        return Actions(log=True, evaluate=not self._last.evaluate, save_model=True)
