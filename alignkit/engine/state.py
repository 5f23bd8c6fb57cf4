"""What the lifecycle hooks see of a run (RunState), the logging window the engine keeps, what the loop has done
so far (Done) and what setup prepared for it (Prepared)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import RunConfig
from alignkit.engine.data import PrepareReport
from alignkit.engine.metrics import add_totals
from alignkit.plugin.method import Method


@dataclass
class RunState:
    """What the lifecycle hooks receive as `run`. Treat it as read-only."""

    config: RunConfig
    method: Method
    output_dir: Path
    is_main_process: bool
    model: Any = None
    tokenizer: Any = None
    max_steps: int = 0
    step: int = 0
    epoch_index: int = 0
    batches_in_epoch: int = 0
    batches_per_epoch: int = 1
    data: dict[str, PrepareReport] = field(default_factory=dict)
    #: the checkpoint this run resumed from (None for a fresh run)
    resumed_from: Path | None = None
    #: optimizer steps skipped for a NaN/inf loss or gradient (train.skip_nonfinite_steps)
    skipped_steps: int = 0
    #: the formatted eval set (None without eval data), e.g. for sampling completions at eval time
    eval_dataset: Any = None
    #: log_table(name, columns, rows): send a table to the trackers that take tables (wandb, comet)
    log_table: Any = None
    #: each unit of the loss's `counts` summed over every training step so far, all processes (for its running_totals)
    seen: dict[str, float] = field(default_factory=dict)

    @property
    def epoch(self) -> float:
        return self.epoch_index + self.batches_in_epoch / self.batches_per_epoch


class Window:
    """Sums since the last log: the loss and gradient norm per step, each metric's (sum, count) (see
    alignkit.engine.metrics). The log is their mean."""

    def __init__(self) -> None:
        self.loss, self.grad_norm, self.steps, self.micro_batches = 0.0, 0.0, 0, 0
        self.metrics: dict[str, list[float]] = {}  # name -> [sum, count] on this process

    def add(self, loss: float, grad_norm: float, metric_totals: dict[str, tuple[float, float]],
            micro_batches: int) -> None:
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.micro_batches += micro_batches
        add_totals(self.metrics, metric_totals)

    def state(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict) -> "Window":
        window = cls()
        vars(window).update(state)
        # checkpoints written before metrics were (sum, count): a sum of micro-batch means
        window.metrics = {k: v if isinstance(v, list) else [v, float(window.micro_batches)]
                          for k, v in window.metrics.items()}
        return window


@dataclass
class Done:
    """What the training loop has done so far: the open logging window, the last log row, the last eval metrics."""

    window: Window
    logs: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return {**self.logs, **self.eval}


@dataclass
class Prepared:
    """What Engine.setup() made for the loop: model, optimizer and loaders prepared by accelerate, the learning-rate
    schedule, and the logging window to continue (a resumed run's, else empty)."""

    model: Any
    optimizer: Any
    scheduler: Any
    train_dl: Any
    eval_dl: Any
    window: Window
