"""transformers.Trainer's training flow on alignkit's engine, for the TRL-style trainers.

`TrainerFlow` is both the engine's Schedule and a plugin on its lifecycle hooks. The hooks keep the
trainer's live TrainerState (global_step, epoch, log_history, best metric) and call its callbacks in
Trainer's order; the schedule turns the TrainerControl flags that transformers' DefaultFlowCallback
(and any user callback) sets into what the engine's loop does: log, evaluate, save a checkpoint, stop.
So logging/eval/save strategies, logging_first_step, eval_on_start, eval_delay and early stopping
follow Trainer, and nothing happens at the end that Trainer would not do (no forced log or eval).
"""

import math
import time

import torch
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import speed_metrics

from alignkit import Actions, Schedule, hookimpl

STATE_NAME, ARGS_NAME = "trainer_state.json", "training_args.bin"


def _steps(value: float, max_steps: int) -> int:
    """Trainer's logging/eval/save steps: a float below 1 is a fraction of max_steps."""
    return math.ceil(max_steps * value) if value and value < 1 else int(value or 0)


class TrainerFlow(Schedule):
    alignkit_all_runs = True  # these hooks serve the trainer's own run

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.total_loss = 0.0  # summed step losses since train() began (Trainer's train_loss numerator)
        self._unlogged: dict[str, list[float]] = {}  # the step metrics since the last log row
        self._epoch_begun = -1
        self._epoch_ended_at = -1
        self._eval_start: float | None = None
        self._pending = Actions()  # what the loop is carrying out now (save_strategy="best" decides after eval)
        self._named_due = False  # several named eval sets to evaluate after this step's log row
        self._named_running = False

    @property
    def args(self):
        return self.trainer.args

    def _call(self, event: str, **kwargs) -> None:
        t = self.trainer
        t.control = getattr(t.callback_handler, event)(t.args, t.state, t.control, **kwargs)

    # ---- the schedule ---------------------------------------------------------------------------

    def _actions(self) -> Actions:
        self._evaluate_named()  # (one left due by a log request the engine did not carry out)
        c = self.trainer.control
        act = Actions(log=c.should_log, evaluate=c.should_evaluate, checkpoint=c.should_save,
                      stop=c.should_training_stop or c.should_epoch_stop)
        c.should_log = False  # the engine logs once per request; evaluate/save are reset by their events
        if act.evaluate:
            self._eval_start = time.time()
        if act.evaluate and self.trainer._eval_datasets is not None:
            act.evaluate, self._named_due = False, True  # the trainer evaluates each set itself,
            if not act.log:  # after the step's log row (Trainer's order: log, evaluate, save)
                self._evaluate_named()
        self._pending = act
        return act

    def _evaluate_named(self) -> None:
        """Trainer's evaluation of a dict of eval sets during training: each as eval_<name>_<metric>."""
        if self._named_due:
            self._named_due, self._named_running = False, True
            try:
                self.trainer.evaluate()
            finally:
                self._named_running = False

    def at_start(self, run) -> Actions:
        self._eval_start = time.time()
        return Actions(evaluate=bool(self.args.eval_on_start))

    def after_step(self, run) -> Actions:
        return self._actions()

    def after_epoch(self, run) -> Actions:
        self._epoch_ended_at = run.step
        self._call("on_epoch_end")
        return self._actions()

    def at_end(self, run) -> Actions:
        """Trainer ends its last epoch after the last step, complete or not; no final log, eval or model save."""
        return Actions() if self._epoch_ended_at == run.step else self.after_epoch(run)

    # ---- the engine's lifecycle hooks -----------------------------------------------------------

    @hookimpl
    def on_train_start(self, run):
        t, args = self.trainer, self.args
        stateful = [cb for cb in [*t.callback_handler.callbacks, t.control] if isinstance(cb, ExportableState)]
        state = TrainerState(stateful_callbacks=stateful)
        if run.resumed_from is not None and (run.resumed_from / STATE_NAME).is_file():
            state = TrainerState.load_from_json(str(run.resumed_from / STATE_NAME))
        steps_per_epoch = max(1, math.ceil(run.batches_per_epoch / t.config.train.gradient_accumulation_steps))
        state.max_steps, state.global_step, state.epoch = run.max_steps, run.step, run.epoch
        state.num_train_epochs = math.ceil(run.max_steps / steps_per_epoch)
        state.logging_steps = _steps(args.logging_steps, run.max_steps)
        state.eval_steps = _steps(args.eval_steps, run.max_steps)
        state.save_steps = _steps(args.save_steps, run.max_steps)
        state.train_batch_size = args.per_device_train_batch_size
        state.is_local_process_zero = t.is_local_process_zero()
        state.is_world_process_zero = t.is_world_process_zero()
        t.state, self.total_loss, self._epoch_begun, self._epoch_ended_at = state, 0.0, -1, -1
        self._unlogged = {}
        self._call("on_train_begin")

    @hookimpl
    def on_step_end(self, run, step, metrics):
        state = self.trainer.state
        if run.epoch_index != self._epoch_begun:
            self._epoch_begun = run.epoch_index
            self._call("on_epoch_begin")
        state.global_step = step - 1
        self._call("on_step_begin")
        self._call("on_pre_optimizer_step")
        self._call("on_optimizer_step")
        state.global_step, state.epoch = step, run.epoch
        self.total_loss += metrics["loss"]
        for key, value in metrics.items():
            if key != "loss":
                self._unlogged.setdefault(key, []).append(float(value))
        self._call("on_step_end")

    @hookimpl
    def on_log(self, run, step, logs):
        self._unlogged = {}
        self.trainer.log(dict(logs))
        self._evaluate_named()

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        t = self.trainer
        if not t.is_in_train or self._named_running:  # trainer.evaluate() writes its own row, with its prefix
            return
        n = len(run.eval_dataset) if run.eval_dataset is not None else 0
        start = self._eval_start or time.time()
        speed = speed_metrics("eval", start, num_samples=n,
                              num_steps=math.ceil(n / self.args.per_device_eval_batch_size))
        if getattr(t, "compute_metrics", None) is not None:  # Trainer's compute_metrics at every evaluation
            loop = t.evaluation_loop(t.engine.eval_batches(), "Evaluation", metric_key_prefix="eval")
            metrics = {**metrics, **{k: v for k, v in loop.metrics.items() if k not in metrics}}
        metrics = {"eval_loss": metrics["eval_loss"], **speed, **metrics}
        if self._best_metric(metrics, run) and self.args.save_strategy == "best":
            self._pending.checkpoint = True  # Trainer saves when the evaluation found a new best (carried out next)
        t.log(metrics)
        self._call("on_evaluate", metrics=metrics)

    def _best_metric(self, metrics: dict, run) -> bool:
        """Trainer's best metric: checked at every evaluation during training, with that step's checkpoint path.
        True when this evaluation is a new best."""
        name = self.args.metric_for_best_model
        if name is None:
            return False
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(f"{type(self.args).__name__}.metric_for_best_model={name!r}: no {key} in the eval metrics; "
                           f"choose from {', '.join(sorted(metrics))}")
        state, value = self.trainer.state, metrics[key]
        better = (lambda a, b: a > b) if self.args.greater_is_better else (lambda a, b: a < b)
        if state.best_metric is None or better(value, state.best_metric):
            state.best_metric = value
            state.best_model_checkpoint = str(self.trainer.checkpoint_root / f"checkpoint-{run.step}")
            if hasattr(state, "best_global_step"):
                state.best_global_step = run.step
            return True
        return False

    @hookimpl
    def on_save(self, run, step, path):
        """Trainer's files beside the engine's in the checkpoint: the TrainerState and the arguments."""
        t = self.trainer
        if t.is_world_process_zero():
            t.state.save_to_json(str(path / STATE_NAME))
            torch.save(t.args, path / ARGS_NAME)
        self._call("on_save")

    def end_of_training(self, start: float, num_samples: int) -> dict[str, float]:
        """The summary metrics Trainer logs after its loop (train_loss: the mean step loss of this call)."""
        state = self.trainer.state
        train_loss = self.total_loss / max(state.global_step, 0.001)
        metrics = speed_metrics("train", start, num_samples=num_samples, num_steps=state.max_steps)
        metrics["total_flos"] = float(state.total_flos)
        metrics["train_loss"] = train_loss
        return metrics

    def unlogged_means(self) -> dict[str, float]:
        """The means of the step metrics since the last log row (TRL's trainers add them to every train log row,
        the summary row after training too); then none are left."""
        out, self._unlogged = {k: sum(v) / len(v) for k, v in self._unlogged.items() if v}, {}
        return out
