"""The one training engine, on accelerate. It knows no method: the method's formatter makes the
batches and the method's loss turns a batch into loss terms and metrics; everything else is here.
"""

import contextlib
import functools
import logging
import math
import signal
import threading
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from alignkit import checkpoint, preflight, resume, rundir
from alignkit.config import RunConfig, to_yaml
from alignkit.data import EpochSampler, load_data, load_splits, prepare
from alignkit.errors import ConfigError, NonFiniteError, TrainingInterrupted
from alignkit.loss import at_least_fp32
from alignkit.method import Method
from alignkit.modelcard import model_card
from alignkit.modeling import apply_peft, load_model, load_tokenizer
from alignkit.reference import Reference, collate_with_reference
from alignkit.reporting import MetricsFile, Plots, ProgressBar, Trackers
from alignkit.state import RunState, Window

log = logging.getLogger(__name__)


def _check_trackers(names: list[str]) -> None:
    """accelerate silently drops a tracker that is not installed: refuse instead."""
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ConfigError(f"train.report_to: {name} is not installed here; pip install {name}, or remove it")


class _EvalStopped(Exception):
    """A stop request ended an evaluation early."""


class Engine:
    """Build once per run; `train()` or `evaluate()`. Model, tokenizer and datasets may be passed in."""

    def __init__(self, config: RunConfig, method: Method, pm, *, model=None, tokenizer=None,
                 train_dataset=None, eval_dataset=None, peft_config=None, optimizers=(None, None),
                 collate_fn=None) -> None:
        self.config, self.method, self.pm = config, method, pm
        t = config.train
        _check_trackers(t.report_to)
        preflight.check_settings(config, method)
        # accelerate keeps precision settings process-wide; each run (a notebook may start several) sets
        # its own. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            # Without cpu=True accelerate ignores torchrun's process group on a machine with no accelerator.
            cpu=t.use_cpu or not torch.accelerator.is_available(),
            mixed_precision="bf16" if t.bf16 else "fp16" if t.fp16 else "no",
            log_with=t.report_to or None, project_dir=t.output_dir,
        )
        self.output_dir = Path(t.output_dir)
        rundir.check_writable(self.output_dir)
        rundir.Lock.probe(self.output_dir)
        self._lock, self._record_notes = rundir.Lock(self.output_dir), []
        set_seed(t.seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.model = model if model is not None else load_model(config.model, self.tokenizer, t.seed)
        if peft_config is not None or config.model.peft is not None:
            self.model = apply_peft(self.model, peft_config or config.model.peft)
        preflight.check_model(config, self.model, self.tokenizer)
        self.optimizer, self.scheduler = optimizers
        self.formatter = method.formatter(config.method, self.tokenizer)
        self.formatter.prepare_model(self.model)
        self.collate_fn = collate_fn or self.formatter.collate
        self.loss = method.loss(config.method)
        self.loss.prepare_model(self.model)
        self.reference = Reference(self.loss, self.model, config, self.tokenizer, self.accelerator)
        self.raw = {"train": train_dataset, "eval": eval_dataset}
        self._formatted: dict[str, tuple] = {}  # split -> (raw dataset, formatted dataset)
        self.state = RunState(config, method, self.output_dir, self.accelerator.is_main_process,
                              self.model, self.tokenizer, log_table=self._log_table)

    # ---- data -------------------------------------------------------------------------------------

    def _datasets(self, need_train: bool) -> dict:
        """Formatted `train` (when training) and `eval` sets; evaluation alone falls back to train."""
        d = self.config.data
        if self.raw["train"] is None and (need_train or (self.raw["eval"] is None and d.eval is None)):
            self.raw["train"], eval_ds = load_splits(d.train, d.train_split, d.eval, d.eval_split,
                                                     d.eval_fraction, self.config.train.seed)
            self.raw["eval"] = self.raw["eval"] if self.raw["eval"] is not None else eval_ds
        elif self.raw["eval"] is None and d.eval is not None:
            self.raw["eval"] = load_data(d.eval, d.eval_split)
        wanted = {"train": (self.raw["train"], d.max_train_samples, d.train)} if need_train else {}
        wanted["eval"] = (self.raw["eval"], d.max_eval_samples, d.eval or d.train)
        if not need_train and self.raw["eval"] is None:
            wanted["eval"] = (self.raw["train"], d.max_eval_samples, d.train)
        out = {}
        for split, (ds, limit, source) in wanted.items():
            if ds is None:
                continue
            if self._formatted.get(split, (None,))[0] is ds:  # formatted already (evaluate() may run often)
                out[split] = self._formatted[split][1]
                continue
            raw = ds
            ds = ds.select(range(min(limit, len(ds)))) if limit else ds
            with self.accelerator.main_process_first():
                out[split], report = prepare(ds, self.formatter, f"{split} data ({source})")
            self._formatted[split] = (raw, out[split])
            self.state.data[split] = report
            if report.dropped or report.truncated:
                log.warning("%s data: %d examples kept, %d truncated%s", split, report.kept, report.truncated,
                            f", {report.dropped} dropped (nothing left to train on after truncation)"
                            if report.dropped else "")
        return out

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        lengths = None
        if shuffle and self.config.train.group_by_length:
            lengths = [self.formatter.length(dict(zip(batch, row))) for batch in ds.iter(batch_size=1000)
                       for row in zip(*batch.values())]
        sampler = EpochSampler(len(ds), self.config.train.seed, lengths, batch_size) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, sampler=sampler,
                          collate_fn=functools.partial(collate_with_reference, self.collate_fn),
                          num_workers=self.config.train.dataloader_num_workers)

    # ---- the training loop ------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        acc, t, state = self.accelerator, self.config.train, self.state
        if self.optimizer is None:
            preflight.check_trainable(self.model)
        data = self._datasets(need_train=True)
        preflight.check_ids(self.collate_fn, data["train"], self.model, self.config.method)

        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model, "peft_config"):  # frozen embeddings: checkpointed blocks need an input with grad
                self.model.enable_input_require_grads()
        optimizer = self.optimizer or self._optimizer()
        if self.reference.precomputed:
            size = t.per_device_eval_batch_size
            data = {split: self.reference.precompute(ds, self.model, self.collate_fn, size) for split, ds in data.items()}
        train_dl = self._loader(data["train"], t.per_device_train_batch_size, shuffle=True)
        model, optimizer, train_dl = acc.prepare(self.model, optimizer, train_dl)
        eval_dl = self._eval_loader(data["eval"]) if "eval" in data else None
        state.eval_dataset = data.get("eval")

        state.batches_per_epoch = len(train_dl)
        steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
        state.max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * state.max_steps)
        scheduler = self.scheduler or get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                                    num_training_steps=state.max_steps,
                                                    scheduler_specific_kwargs=t.lr_scheduler_kwargs)
        self._scheduler = scheduler
        window = self._start_run()

        observers = [MetricsFile(self.output_dir / "metrics.jsonl"), ProgressBar(t.disable_tqdm)]
        observers += [Trackers(acc)] if t.report_to else []
        observers += [Plots(self.output_dir)] if t.plots else []
        for obs in observers:
            self.pm.register(obs)
        stack = contextlib.ExitStack()
        stack.callback(self._lock.release)
        try:
            stack.enter_context(self._stop_on_signals())
            self.pm.hook.on_train_start(run=state)
            starting = t.eval_on_start and eval_dl is not None and state.step == 0  # not again on resume
            eval_metrics = self._evaluate_and_report(model, eval_dl) if starting else {}
            logs: dict[str, float] = {}
            model.train()
            for micro_batches in self._windows(train_dl):
                loss, metric_sums, grad_norm = self._optimizer_step(model, optimizer, scheduler, micro_batches)
                state.step += 1
                window.add(loss, grad_norm, metric_sums, len(micro_batches))
                self.pm.hook.on_step_end(run=state, step=state.step, metrics={
                    "loss": loss, **{k: v / len(micro_batches) for k, v in metric_sums.items()}})

                if state.step % t.logging_steps == 0 or state.step == state.max_steps or (
                        t.logging_first_step and state.step == 1):
                    logs = self._reduce_window(window, scheduler)
                    window = Window()
                    self.pm.hook.on_log(run=state, step=state.step, logs=logs)
                if eval_dl is not None and t.eval_steps and state.step % t.eval_steps == 0:
                    eval_metrics = self._evaluate_and_report(model, eval_dl)
                if t.save_steps and state.step % t.save_steps == 0 and state.step < state.max_steps:
                    self._save_checkpoint(window)
                if state.step >= state.max_steps:
                    break
                if signum := self._stop_requested():
                    path = self._save_checkpoint(window)
                    raise TrainingInterrupted(
                        f"{signal.Signals(signum).name} at step {state.step}: checkpoint saved in {path}; resume by "
                        "running the same command with train.resume_from_checkpoint=auto", signum)

            if eval_dl is not None and not (t.eval_steps and state.step % t.eval_steps == 0):
                eval_metrics = self._evaluate_and_report(model, eval_dl)
            self._stop_if_asked(window)
            final = {**logs, **eval_metrics}
            if state.skipped_steps:
                log.warning("%d of %d steps were skipped for a non-finite loss or gradient", state.skipped_steps, state.step)
            self.save_model(model, final)
            self._stop_if_asked(window, saved_model=True)
            self.pm.hook.on_train_end(run=state, metrics=final)
        finally:
            stack.close()
            for obs in observers:
                self.pm.unregister(obs)
        return final

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM ask training to stop after the current step (or eval batch), with a checkpoint; a
        second one stops at once."""
        self._stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum, frame):
            if self._stop_signal:  # asked twice: stop at once; checkpoints are renamed into place whole
                found = checkpoint.checkpoints(self.output_dir / "checkpoints")
                kept = f"the last complete checkpoint, {found[-1]}, is kept" if found else "no checkpoint was written"
                raise TrainingInterrupted(f"second {signal.Signals(signum).name} during step {self.state.step + 1}: stopped "
                                          f"at once; {kept}; resume with train.resume_from_checkpoint=auto", signum)
            self._stop_signal = signum

        previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> int:
        """The signal that asked to stop (0 if none), agreed on by every process."""
        if self.accelerator.num_processes == 1:
            return self._stop_signal
        flag = torch.tensor(self._stop_signal, device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, "max"))

    def _windows(self, train_dl):
        """Yield the micro-batches of each optimizer step, epoch after epoch, from the resume point."""
        state, ga = self.state, self.config.train.gradient_accumulation_steps
        while state.step < state.max_steps:  # resumed from a checkpoint of the last step: nothing left
            train_dl.set_epoch(state.epoch_index)
            skip = state.batches_in_epoch
            batches = self.accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            micro_batches = []
            for batch in batches:
                micro_batches.append(batch)
                state.batches_in_epoch += 1
                if len(micro_batches) == ga:
                    yield micro_batches
                    micro_batches = []
            if micro_batches:
                yield micro_batches
            state.epoch_index, state.batches_in_epoch = state.epoch_index + 1, 0

    def _optimizer_step(self, model, optimizer, scheduler, micro_batches) -> tuple[float, dict[str, float], float]:
        """One optimizer step over the micro-batches: (global loss, metric sums, gradient norm).

        A NaN/inf loss or gradient never reaches the weights: the run stops naming the step, or with
        train.skip_nonfinite_steps the step is skipped."""
        t = self.config.train
        loss_sum, metric_sums = self._accumulate_gradients(model, micro_batches)
        grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf")))
        global_loss = self.accelerator.reduce(loss_sum, "sum").item()
        if math.isfinite(global_loss) and math.isfinite(grad_norm):
            optimizer.step()
            self._check_update(model, global_loss, grad_norm)
            scheduler.step()
        elif t.skip_nonfinite_steps:
            # Warned once; later ones at debug level, and their number at the end of training.
            (log.debug if self.state.skipped_steps else log.warning)(
                "step %d: loss %s, gradient norm %s; step skipped (train.skip_nonfinite_steps; later skips are "
                "counted and reported at the end)", self.state.step + 1, global_loss, grad_norm)
            self.state.skipped_steps += 1
        else:
            raise NonFiniteError(f"step {self.state.step + 1}: loss {global_loss}, gradient norm {grad_norm}; no weights "
                                 "were changed. Lower the learning rate, check the data, or set train.skip_nonfinite_steps=true")
        optimizer.zero_grad(set_to_none=True)
        values = torch.stack(list(metric_sums.values())).tolist() if metric_sums else []  # one device sync
        return global_loss, dict(zip(metric_sums, values)), grad_norm

    def _check_update(self, model, loss: float, grad_norm: float) -> None:
        """The weights after the step must be finite too (a finite loss and gradient can still give NaN/inf
        weights: an infinite learning rate, an optimizer in too low a precision). One reduction, one sync."""
        params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        total = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in params]).sum()
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, "sum")
        if math.isfinite(total.item()):
            return
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        bad = next((n for n, p in zip(names, params) if not torch.isfinite(p.detach()).all()), "some parameter")
        raise NonFiniteError(f"step {self.state.step + 1}: the update made {bad} NaN/inf although the loss ({loss:.6g}) and "
                             f"gradient norm ({grad_norm:.6g}) were finite; nothing more is saved, the last checkpoint stays "
                             "valid. Lower train.learning_rate, or train float32 weights")

    def _accumulate_gradients(self, model, micro_batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backward over each micro-batch, every loss term divided by its count over all of them and all ranks."""
        acc = self.accelerator
        totals = self._global_counts(micro_batches)
        loss_sum = torch.zeros((), device=acc.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                with acc.autocast():
                    out = self._loss(model, batch)
                loss = out.normalized(totals)
                # DDP averages gradients over processes; the totals already span them, so undo that mean.
                acc.backward(loss * acc.num_processes)
            loss_sum += loss.detach()
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + at_least_fp32(v.detach())
        return loss_sum, metric_sums

    def _loss(self, model, batch: dict):
        ref = self.reference(model, batch)
        return self.loss(model, batch) if ref is None else self.loss(model, batch, ref=ref)

    def _global_counts(self, micro_batches) -> dict[str, float]:
        counts: Counter = Counter()
        for batch in micro_batches:
            counts.update(self.loss.counts(batch))
        units = sorted(counts)
        summed = self.accelerator.reduce(torch.tensor([counts[u] for u in units], device=self.accelerator.device), "sum")
        return {u: float(c) for u, c in zip(units, summed.tolist())}

    def _reduce_window(self, window: Window, scheduler) -> dict[str, float]:
        """Window means: loss over steps (already global), metrics over micro-batches then processes."""
        names = sorted(window.metrics)
        local = torch.tensor([window.metrics[k] / window.micro_batches for k in names], device=self.accelerator.device)
        means = self.accelerator.reduce(local, "mean").tolist() if names else []
        return {"loss": window.loss / window.steps, "grad_norm": window.grad_norm / window.steps,
                "learning_rate": scheduler.get_last_lr()[0], **dict(zip(names, means))}

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Evaluate the model as it is on the eval data (or the train data when there is none), in order;
        `eval_dataset` replaces the eval data."""
        if eval_dataset is not None:
            self.raw["eval"] = eval_dataset
        dl = self._eval_loader(self._datasets(need_train=False)["eval"])
        return self._evaluate(self.accelerator.prepare(self.model), dl)

    def eval_batches(self) -> DataLoader:
        """The eval set formatted and collated in order, as this process sees it (for custom eval loops)."""
        ds = self._datasets(need_train=False)["eval"]
        return self._loader(ds, self.config.train.per_device_eval_batch_size, shuffle=False)

    def _sharded(self) -> bool:
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                     DistributedType.MEGATRON_LM)

    def _eval_loader(self, ds) -> DataLoader:
        """Eval batches split over processes without repeating samples to even them out (accelerate's
        default), so several processes see exactly the batches one process sees. Sharded models need
        every rank in every forward, so there accelerate's even batches stay."""
        acc = self.accelerator
        even, acc.even_batches = acc.even_batches, self._sharded()
        try:
            return acc.prepare(self._loader(ds, self.config.train.per_device_eval_batch_size, shuffle=False))
        finally:
            acc.even_batches = even

    def _evaluate(self, model, eval_dl) -> dict[str, float]:
        """Per-batch loss (each batch normalised by its own counts) and metrics, averaged over all batches
        of all processes: the same numbers as one process."""
        if not self._sharded():  # uneven batch counts per process: no collective may run in the forward
            model = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        stopped = False
        with torch.no_grad():
            for batch in eval_dl:
                if getattr(self, "_stop_signal", 0):  # asked to stop: the partial result is not reported
                    stopped = True
                    break
                with self.accelerator.autocast():
                    out = self._loss(model, batch)
                totals = {u: float(c) for u, c in self.loss.counts(batch).items()}
                for k, v in {"loss": out.normalized(totals), **out.metrics}.items():
                    sums[k] = sums.get(k, 0) + at_least_fp32(v.detach())
        model.train(was_training)
        names = sorted(sums)
        local = torch.stack([torch.tensor(float(len(eval_dl)), device=self.accelerator.device)]
                            + [sums[k].to(self.accelerator.device) for k in names])
        total = self.accelerator.reduce(local, "sum").tolist()  # every process reduces once, stopped or not
        if stopped:
            raise _EvalStopped
        return {f"eval_{k}": v / total[0] for k, v in zip(names, total[1:])}

    def _evaluate_and_report(self, model, eval_dl) -> dict[str, float]:
        try:
            metrics = self._evaluate(model, eval_dl)
        except _EvalStopped:
            log.warning("step %d: evaluation cut short by a stop request; not reported", self.state.step)
            return {}
        self.pm.hook.on_evaluate(run=self.state, step=self.state.step, metrics=metrics)
        return metrics

    def _stop_if_asked(self, window: Window, saved_model: bool = False) -> None:
        """A stop asked for during the final evaluation or save is never swallowed (non-zero exit)."""
        signum = self._stop_requested()
        if not signum:
            return
        name = signal.Signals(signum).name
        if saved_model:
            raise TrainingInterrupted(f"{name} while saving the model at step {self.state.step}: the model was saved "
                                      f"completely in {self.output_dir}", signum)
        path = self._save_checkpoint(window)
        raise TrainingInterrupted(f"{name} at step {self.state.step} (the last), before the model was saved: checkpoint "
                                  f"saved in {path}; resume by running the same command with "
                                  "train.resume_from_checkpoint=auto", signum)

    # ---- saving and resuming ----------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; biases and norm weights (1-D parameters) get no weight decay, as in transformers."""
        t = self.config.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)

    def _start_run(self) -> Window:
        """Take the output folder (lock, ownership), resume if asked, write config.yaml (alignkit.rundir)."""
        self._lock = rundir.Lock(self.output_dir)
        self._resume_notes: list[str] = []
        self._record_notes: list[str] = []
        try:
            self._on_main(self._lock.acquire)
            window = self._resume()
            self._on_main(self._prepare_output_dir)
        except BaseException:
            self._lock.release(discard_folder=True)
            raise
        return window

    def _on_main(self, fn):
        """Run fn on the main process only; its ConfigError (or its result) reaches every process."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [None, None]
        if acc.is_main_process:
            try:
                box[0] = fn()
            except ConfigError as e:
                box[1] = str(e)
        broadcast_object_list(box)
        if box[1] is not None:
            raise ConfigError(box[1])
        return box[0]

    def _resume(self) -> Window:
        spec = self.config.train.resume_from_checkpoint
        path = self._on_main(lambda: checkpoint.find(spec, self.output_dir / "checkpoints")) if spec else None
        if path is None:
            if spec == "auto":
                log.info("train.resume_from_checkpoint=auto: no checkpoint in %s yet, starting fresh", self.output_dir)
            return Window()
        own = path.resolve().parent == (self.output_dir / "checkpoints").resolve()
        if not own and rundir.has_results(self.output_dir):
            raise ConfigError(f"train.resume_from_checkpoint: {path} belongs to another run than train.output_dir "
                              f"{self.output_dir}, which holds a run of its own; resume into {path.parent.parent} or "
                              "an empty output_dir")
        self._resume_notes = resume.check_config(path, self.config)
        saved = checkpoint.load(self.accelerator, path, self._scheduler)
        self.state.resumed_from = path
        if saved["max_steps"] != self.state.max_steps:
            raise ConfigError(f"train.resume_from_checkpoint: {path} was made for {saved['max_steps']} steps, "
                              f"this run has {self.state.max_steps}; keep the data and step settings of that run")
        for key in ("step", "epoch_index", "batches_in_epoch"):
            setattr(self.state, key, saved[key])
        log.info("resumed from %s at step %d", path, self.state.step)
        return Window.from_state(saved["window"])

    def _prepare_output_dir(self) -> None:
        """Refuse an output_dir that holds another run's results; a fresh run starts in an emptied folder."""
        t, out = self.config.train, self.output_dir
        config_text = to_yaml(self.config, comments=False)
        notes = []
        if self.state.resumed_from is None:
            saved = out / "config.yaml"
            if rundir.has_results(out):
                same_run = saved.is_file() and not saved.is_symlink() and resume.same_run(saved.read_text(), self.config)
                if not (same_run or t.overwrite_output_dir):
                    raise ConfigError(f"train.output_dir: {out} is not empty and holds another run; continue it with "
                                      "train.resume_from_checkpoint=auto, write over it with train.overwrite_output_dir=true, "
                                      "or choose another output_dir")
                if not (saved.is_file() or (out / "checkpoints").is_dir()):
                    raise ConfigError(f"train.overwrite_output_dir: {out} holds files alignkit did not write "
                                      f"({', '.join(p.name for p in rundir.entries(out)[:5])}); it replaces only an "
                                      "alignkit run's folder: choose another output_dir")
                log.warning("%s: starting over; removing the previous run's files: %s", out, ", ".join(rundir.clear(out)))
            elif [p for p in rundir.entries(out) if p.name != rundir.LOCK_FILE]:
                log.warning("%s: the previous attempt left no checkpoint or model; removing its %s and starting over",
                            out, ", ".join(rundir.clear(out)))
        else:
            rundir.refuse_symlinks(out)
            resume.repair_metrics(out / "metrics.jsonl")
            notes = resume.notes(out / "config.yaml")
            if self._resume_notes:
                notes.append(f"{resume.NOTE_PREFIX}at step {self.state.step} from {self.state.resumed_from.name} with "
                             f"changed settings: {'; '.join(self._resume_notes)}")
                log.warning("resuming with changed settings (recorded in config.yaml): %s", "; ".join(self._resume_notes))
        self._record_notes = notes
        rundir.write_text(out / "config.yaml", "".join(n + "\n" for n in notes) + config_text)

    def _check_finite_weights(self, where: str) -> None:
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # one device sync
        if not all(finite):
            name = named[finite.index(False)][0]
            raise NonFiniteError(f"refusing to write {where}: parameter {name} holds NaN/inf values")

    def _save_checkpoint(self, window: Window) -> Path:
        s = self.state
        saved = {"step": s.step, "epoch_index": s.epoch_index, "batches_in_epoch": s.batches_in_epoch,
                 "max_steps": s.max_steps, "window": window.state()}
        self._check_finite_weights("a checkpoint")
        path = checkpoint.save(self.accelerator, self.output_dir / "checkpoints", s.step, saved,
                               self.config.train.save_total_limit, self._scheduler,
                               files={checkpoint.CONFIG_FILE: to_yaml(self.config, comments=False)})
        self.pm.hook.on_save(run=s, step=s.step, path=path)
        return path

    def save_model(self, model=None, metrics: dict | None = None, output_dir: Path | None = None,
                   tags: list[str] = ()) -> None:
        """Model (or LoRA adapter), tokenizer and model card in output_dir, loadable with from_pretrained."""
        acc, out = self.accelerator, Path(output_dir or self.output_dir)
        model = model if model is not None else self.model
        self._check_finite_weights("the model")
        acc.wait_for_everyone()
        acc.unwrap_model(model).save_pretrained(out, is_main_process=acc.is_main_process,
                                                save_function=acc.save, state_dict=acc.get_state_dict(model))
        if acc.is_main_process:
            self.tokenizer.save_pretrained(out)
            (out / "README.md").write_text(model_card(self.config, self.method, metrics or {}, list(tags),
                                                      notes=self._record_notes))
        acc.wait_for_everyone()

    def _log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table(name, columns=columns, data=rows, step=self.state.step)


