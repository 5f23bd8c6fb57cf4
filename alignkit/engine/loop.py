"""The one training engine, on accelerate. It knows no method: the method's formatter makes the
batches and the method's loss turns a batch into loss terms and metrics; everything else is here.

`train()` is a few setup steps (data, optimizer, loaders, schedule, resume, output folder, observers)
and the loop; each optimizer step is [rollout] -> counts -> reference -> loss -> backward per micro-batch.
"""

import contextlib
import functools
import logging
import math
import os
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from alignkit.config import RunConfig, environment_values, recorded, to_yaml
from alignkit.engine import checkpoint, optim, preflight, resume, rundir
from alignkit.engine.evaluation import EvalStopped, evaluate_batches
from alignkit.engine.metrics import MetricSums, means, reduce_totals
from alignkit.engine.modelcard import model_card
from alignkit.engine.modeling import apply_peft, load_model, load_tokenizer
from alignkit.engine.ownership import files_in
from alignkit.engine.reference import Reference
from alignkit.engine.reporting import check_trackers, observers
from alignkit.engine.rundata import RunData
from alignkit.engine.schedule import Actions, Schedule
from alignkit.engine.state import RunState, Window
from alignkit.errors import ConfigError, NonFiniteError, TrainingInterrupted
from alignkit.online.rollout import RolloutStage, build_rollout
from alignkit.plugin.context import StepContext, call
from alignkit.plugin.method import Method
from alignkit.plugins import RunHooks

log = logging.getLogger(__name__)


class Engine:
    """Build once per run; `train()` or `evaluate()`. Model, tokenizer and datasets may be passed in."""

    def __init__(self, config: RunConfig, method: Method, pm, *, model=None, tokenizer=None,
                 train_dataset=None, eval_dataset=None, schedule: Schedule | None = None,
                 optimizer: Callable | None = None, lr_scheduler: Callable | None = None,
                 check_folder: bool = True, config_file: str | None = None) -> None:
        self.config, self.method, self.pm = config, method, pm
        self.config_file = config_file  # the -c file: a run never removes or replaces it (alignkit.engine.ownership)
        t = config.train
        check_trackers(t.report_to)
        preflight.check_settings(config, method, eval_given=eval_dataset is not None)
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
        rundir.check_writable(self.output_dir)  # before any work: nothing is loaded for a run that cannot write
        rundir.Lock.probe(self.output_dir)
        self._lock, self._record_notes, self.folder = rundir.Lock(self.output_dir), [], None
        if check_folder:  # training: a folder it may not write or clean is refused before any work
            resume.precheck(self)
        set_seed(t.seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        rollout = build_rollout(method, config, self.tokenizer, pm)  # online methods (alignkit.online.rollout); checks rewards
        self.rollout = RolloutStage(rollout) if rollout is not None else None
        self.model = model if model is not None else load_model(config.model, self.tokenizer, t.seed,
                                                                method.model_kind, method.num_labels)
        if model is None:  # what a LoRA adapter records as its base: a path from ${oc.env:...} stays unwritten
            self.model.name_or_path = recorded(config).model.name_or_path
        if config.model.peft is not None:
            self.model = apply_peft(self.model, config.model.peft)
        preflight.check_model(config, self.model, self.tokenizer)
        # optimizer(model) and lr_scheduler(optimizer, num_training_steps) replace train.optim / lr_scheduler_type;
        # a Schedule replaces when the loop logs, evaluates, checkpoints and stops (alignkit.engine.schedule)
        self.schedule = schedule or Schedule(t)
        self.make_optimizer = optimizer or functools.partial(optim.build_optimizer, train=t)
        self.make_scheduler = lr_scheduler or (lambda opt, num_training_steps: optim.schedule(t, opt, num_training_steps))
        self.formatter = method.formatter(config.method, self.tokenizer)
        self.formatter.prepare_model(self.model)
        self.collate_fn = self.formatter.collate
        self.loss = method.loss(config.method)
        self.loss.prepare_model(self.model)
        self.reference = Reference(self.loss, self.model, config, self.tokenizer, self.accelerator)
        self.state = RunState(config, method, self.output_dir, self.accelerator.is_main_process,
                              self.model, self.tokenizer, log_table=self._log_table)
        self.data = RunData(config, self.formatter, self.collate_fn, self.accelerator, pm, self.state.data,
                            train_dataset, eval_dataset)
        self.hooks = RunHooks(pm, method)  # lifecycle hooks scoped to this method's plugin (docs/hooks.md)
        self.generator = None  # the generation handle of online methods (StepContext.generator)
        self.resume_path = None  # the checkpoint train() resumes from (resume.check)
        # the step whose evaluation a stop request cut short (saved with its checkpoint), and the step at which a
        # resumed run redoes such an evaluation first (not repeated at the end)
        self.eval_cut_at: int | None = None
        self.eval_redo_at: int | None = None

    # ---- data -------------------------------------------------------------------------------------

    def _datasets(self, need_train: bool) -> dict:
        """Formatted `train` (when training) and `eval` sets; evaluation alone falls back to train."""
        return self.data.formatted(need_train)

    def _loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        return self.data.loader(ds, batch_size, shuffle)

    # ---- training: setup steps, then the loop -----------------------------------------------------

    def train(self) -> dict[str, float]:
        # The folder and the checkpoint are checked before any work: a refusal leaves nothing behind.
        self.resume_path = resume.check(self)
        if isinstance(self.make_optimizer, functools.partial):  # train.optim, not an optimizer passed in
            preflight.check_trainable(self.model, self.config.train.optim)
        data = self._datasets(need_train=True)
        preflight.check_ids(self.collate_fn, data["train"], self.model, self.config.method)
        optimizer = self._setup_optimizer()
        data = self._precompute_reference(data)
        model, optimizer, train_dl = self._setup_training(data["train"], optimizer)
        eval_dl = self._eval_loader(data["eval"]) if "eval" in data else None
        self.state.eval_dataset = data.get("eval")
        scheduler = self._setup_schedule(optimizer, train_dl)
        window = resume.start(self)  # the output folder's lock, resume checks, config.yaml (alignkit.engine.resume)
        try:
            with self._observers(), self._stop_on_signals():
                return self._loop(model, optimizer, scheduler, train_dl, eval_dl, window)
        finally:
            self._lock.release()

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        """Gradient checkpointing if asked, then the optimizer passed in or train.optim (alignkit.engine.optim)."""
        t = self.config.train
        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model, "peft_config"):  # frozen embeddings: checkpointed blocks need an input with grad
                self.model.enable_input_require_grads()
        return self.make_optimizer(self.model)  # before precomputing: same RNG use as ever

    def _precompute_reference(self, data: dict) -> dict:
        """The data with the reference's outputs as columns when the loss precomputes them (else unchanged)."""
        if not self.reference.precomputed:
            return data
        size, context = self.config.train.per_device_eval_batch_size, functools.partial(self._context, False)
        return {split: self.reference.precompute(ds, self.model, self.collate_fn, size, context)
                for split, ds in data.items()}

    def _setup_training(self, train_ds, optimizer):
        """The model, optimizer and shuffled train loader, prepared by accelerate."""
        train_dl = self._loader(train_ds, self.config.train.per_device_train_batch_size, shuffle=True)
        model, optimizer, train_dl = self.accelerator.prepare(self.model, optimizer, train_dl)
        self._attach_generator(model)
        return model, optimizer, train_dl

    def _attach_generator(self, model) -> None:
        """Online methods sample from the prepared policy through the core's generation handle."""
        if self.rollout is not None:
            self.generator = self.rollout.attach(model, self.accelerator, self.tokenizer, self.config.train.seed,
                                                 self.reference.for_generation(model))

    def _setup_schedule(self, optimizer, train_dl):
        """The run's length in steps and the learning-rate schedule over it."""
        self.state.batches_per_epoch = len(train_dl)
        passes = self.rollout.iterations if self.rollout is not None else 1
        self.state.max_steps = optim.max_steps(self.config.train, len(train_dl), passes)
        self._scheduler = self.make_scheduler(optimizer, num_training_steps=self.state.max_steps)
        return self._scheduler

    @contextlib.contextmanager
    def _observers(self):
        """metrics.jsonl, the progress bar, trackers and plots watch this run (registered for its length)."""
        found = observers(self.state, self.accelerator)
        for obs in found:
            self.pm.register(obs)
        try:
            yield
        finally:
            for obs in found:
                self.pm.unregister(obs)

    def _loop(self, model, optimizer, scheduler, train_dl, eval_dl, window: Window) -> dict[str, float]:
        """Steps until max_steps; the schedule says when to log, evaluate, checkpoint and stop (alignkit.engine.schedule)."""
        state, hooks = self.state, self.hooks
        hooks.on_train_start(run=state)
        done = {"logs": {}, "eval": {}, "window": window}
        self._do(self.schedule.at_start(state), done, model, eval_dl, scheduler)
        if self.eval_redo_at is not None and eval_dl is not None:  # resumed from a stop during an evaluation
            done["eval"] = self._evaluate_and_report(model, eval_dl)
        self._stop_if_asked(done["window"])  # asked during that evaluation: stop before the first step
        model.train()
        windows = self.data.step_batches(train_dl, state)
        for micro_batches in self.rollout.windows(windows) if self.rollout is not None else windows:
            loss, totals, grad_norm = self._optimizer_step(model, optimizer, scheduler, micro_batches)
            state.step += 1
            done["window"].add(loss, grad_norm, totals, len(micro_batches))
            hooks.on_step_end(run=state, step=state.step, metrics={"loss": loss, **means(totals)})
            stop = self._do(self.schedule.after_step(state), done, model, eval_dl, scheduler)
            if state.batches_in_epoch == state.batches_per_epoch and self._between_rollouts():  # it ended an epoch
                stop |= self._do(self.schedule.after_epoch(state), done, model, eval_dl, scheduler)
            if stop or state.step >= state.max_steps:
                break
            self._stop_if_asked(done["window"])
        end = self.schedule.at_end(state)
        self._do(end, done, model, eval_dl, scheduler)
        self._stop_at_the_end(done["window"])
        final = {**done["logs"], **done["eval"]}
        if state.skipped_steps:
            log.warning("%d of %d steps were skipped for a non-finite loss or gradient", state.skipped_steps, state.step)
        if end.save_model:
            self.save_model(model, final)
            self._stop_at_the_end(done["window"], saved_model=True)
        hooks.on_train_end(run=state, metrics=final)
        return final

    def _do(self, act: Actions, done: dict, model, eval_dl, scheduler) -> bool:
        """Carry out what the schedule asked for (True: stop after this step); `done` keeps the last log row,
        the last eval metrics and the open logging window."""
        if act.log and done["window"].steps:
            done["logs"], done["window"] = self._reduce_window(done["window"], scheduler), Window()
            self.hooks.on_log(run=self.state, step=self.state.step, logs=done["logs"])
        if act.evaluate and eval_dl is not None and self.eval_redo_at != self.state.step:
            done["eval"] = self._evaluate_and_report(model, eval_dl)
        if act.checkpoint and self._between_rollouts():
            self._save_checkpoint(done["window"])
        return act.stop

    def _between_rollouts(self) -> bool:
        """No rollout waits for more optimisation passes (checkpoints are written only here)."""
        return self.rollout is None or self.rollout.between_rollouts

    def _stop_if_asked(self, window: Window) -> None:
        if self._between_rollouts() and (signum := self._stop_requested()):
            path = self._save_checkpoint(window)
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name} at step {self.state.step}: checkpoint saved in {path}; resume by "
                "running the same command with train.resume_from_checkpoint=auto", signum)

    def _stop_at_the_end(self, window: Window, saved_model: bool = False) -> None:
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

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM ask training to stop after the current step (or eval batch), with a checkpoint;
        a second one stops at once."""
        self._stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask_to_stop(signum, frame):
            if self._stop_signal:  # asked twice: stop at once; checkpoints are renamed into place whole
                found = checkpoint.checkpoints(self.checkpoint_root)
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

    # ---- one optimizer step -----------------------------------------------------------------------

    def _context(self, training: bool, index: int, count: int) -> StepContext:
        acc = self.accelerator
        return StepContext(training, self.state.step, index, count, acc.num_processes, acc.process_index,
                           acc.device, self.generator, acc.reduce)

    def _optimizer_step(self, model, optimizer, scheduler, micro_batches) -> tuple[float, dict, float]:
        """One optimizer step: (global loss, this process's metric (sum, count) totals, gradient norm).

        A NaN/inf loss or gradient never reaches the weights: the run stops naming the step, or with
        train.skip_nonfinite_steps the step is skipped."""
        t = self.config.train
        ctxs = [self._context(True, i, len(micro_batches)) for i in range(len(micro_batches))]
        micro_batches = self._rollout(model, micro_batches, ctxs)
        loss_sum, metrics = self._accumulate_gradients(model, micro_batches, ctxs)
        grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf")))
        global_loss = self.accelerator.reduce(loss_sum, "sum").item()
        if math.isfinite(global_loss) and math.isfinite(grad_norm):
            optimizer.step()
            preflight.check_update(model, self.accelerator, self.state.step + 1, global_loss, grad_norm)
            scheduler.step()
            if self.rollout is not None:
                self.rollout.after_step()
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
        return global_loss, metrics.totals(), grad_norm

    def _rollout(self, model, batches: list, ctxs: list[StepContext]) -> list:
        """The method's rollout stage (online methods): each batch of prompt rows -> the batch the loss sees."""
        return batches if self.rollout is None else self.rollout(batches, ctxs)

    def _accumulate_gradients(self, model, micro_batches, ctxs=None) -> tuple[torch.Tensor, MetricSums]:
        """Counts, then reference, loss and backward over each micro-batch, every loss term divided by its
        count over all of them and all processes."""
        acc = self.accelerator
        ctxs = ctxs or [self._context(True, i, len(micro_batches)) for i in range(len(micro_batches))]
        totals = self._global_counts(micro_batches, ctxs)
        for ctx in ctxs:
            ctx.totals = totals  # what each summed term will be divided by (a fused LM head weights its terms so)
        for unit, count in totals.items():
            self.state.seen[unit] = self.state.seen.get(unit, 0.0) + count
        loss_sum, metrics = torch.zeros((), device=acc.device), MetricSums(acc.device)
        for i, (batch, ctx) in enumerate(zip(micro_batches, ctxs)):
            with contextlib.nullcontext() if i == len(micro_batches) - 1 else acc.no_sync(model):
                with acc.autocast():
                    out = self._loss(model, batch, ctx)
                loss = out.normalized(totals)
                # DDP averages gradients over processes; the totals already span them, so undo that mean.
                acc.backward(loss * acc.num_processes)
            loss_sum += loss.detach()
            metrics.add(out.metrics)
        return loss_sum, metrics

    def _loss(self, model, batch: dict, ctx: StepContext):
        ref = self.reference(model, batch, ctx)
        return call(self.loss, model, batch, ctx=ctx, **({} if ref is None else {"ref": ref}))

    def _global_counts(self, micro_batches, ctxs) -> dict[str, float]:
        counts: Counter = Counter()
        for batch, ctx in zip(micro_batches, ctxs):
            counts.update(call(self.loss.counts, batch, ctx=ctx))
        units = sorted(counts)
        summed = self.accelerator.reduce(torch.tensor([counts[u] for u in units], device=self.accelerator.device), "sum")
        return {u: float(c) for u, c in zip(units, summed.tolist())}

    def _reduce_window(self, window: Window, scheduler) -> dict[str, float]:
        """Window means: loss and gradient norm over steps (already global), metrics sum / count over all
        micro-batches of all processes."""
        return {"loss": window.loss / window.steps, "grad_norm": window.grad_norm / window.steps,
                "learning_rate": scheduler.get_last_lr()[0], **means(reduce_totals(window.metrics, self.accelerator)),
                **self._running_totals()}

    def _running_totals(self) -> dict[str, float]:
        """The loss's running_totals: its units' counts over all training so far."""
        return {name: self.state.seen.get(unit, 0.0) for name, unit in self.loss.running_totals.items()}

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Evaluate the model as it is on the eval data (or the train data when there is none), in order, as
        the evaluation during training does (on_evaluate hooks included); `eval_dataset` replaces the eval data."""
        if eval_dataset is not None:
            self.data.raw["eval"] = eval_dataset
        ds = self._datasets(need_train=False)["eval"]
        self.state.eval_dataset = ds
        model = self.accelerator.prepare(self.model)
        self._attach_generator(model)
        return self._evaluate_and_report(model, self._eval_loader(ds))

    def eval_batches(self) -> DataLoader:
        """The eval set formatted and collated in order, as this process sees it (for custom eval loops)."""
        ds = self._datasets(need_train=False)["eval"]
        return self._loader(ds, self.config.train.per_device_eval_batch_size, shuffle=False)

    def _lockstep(self) -> bool:
        """Every process must run every eval forward: sharded models, and losses that reduce across processes."""
        return self.loss.collective or self.accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)

    def _eval_loader(self, ds) -> DataLoader:
        """Eval batches split over processes without repeating samples to even them out (accelerate's
        default), so several processes see exactly the batches one process sees. In lock-step (sharded
        models, collective losses) accelerate's even batches stay."""
        acc = self.accelerator
        even, acc.even_batches = acc.even_batches, self._lockstep()
        try:
            return acc.prepare(self._loader(ds, self.config.train.per_device_eval_batch_size, shuffle=False))
        finally:
            acc.even_batches = even

    def _evaluate_and_report(self, model, eval_dl) -> dict[str, float]:
        if not self._lockstep():  # uneven batch counts per process: no collective may run in the forward
            model = self.accelerator.unwrap_model(model)
        context = functools.partial(self._context, False)
        rollout = self.rollout.evaluate if self.rollout is not None else None
        try:
            metrics = evaluate_batches(model, eval_dl, self.loss, self._loss, context, self.accelerator, rollout,
                                       stop=lambda: bool(getattr(self, "_stop_signal", 0)))
        except EvalStopped:
            log.warning("step %d: evaluation cut short by a stop request; not reported (a resumed run redoes it)",
                        self.state.step)
            self.eval_cut_at = self.state.step
            return {}
        metrics.update({f"eval_{name}": value for name, value in self._running_totals().items()})
        self.hooks.on_evaluate(run=self.state, step=self.state.step, metrics=metrics)
        return metrics

    # ---- saving and resuming ----------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        """The folder of the checkpoint-N folders (train.checkpoint_dir, under output_dir)."""
        return self.output_dir / self.config.train.checkpoint_dir

    def _check_finite_weights(self, where: str) -> None:
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # one device sync
        if not all(finite):
            name = named[finite.index(False)][0]
            raise NonFiniteError(f"refusing to write {where}: parameter {name} holds NaN/inf values")

    def _save_checkpoint(self, window: Window) -> Path:
        s = self.state
        saved = {"step": s.step, "epoch_index": s.epoch_index, "batches_in_epoch": s.batches_in_epoch,
                 "max_steps": s.max_steps, "window": window.state(), "seen": dict(s.seen),
                 "environment": environment_values(self.config), "eval_pending": self.eval_cut_at == s.step}
        self._check_finite_weights("a checkpoint")
        path = checkpoint.save(self.accelerator, self.checkpoint_root, s.step, saved,
                               self.config.train.save_total_limit, self._scheduler,
                               files={checkpoint.CONFIG_FILE: to_yaml(self.config, comments=False)}, folder=self.folder)
        self.hooks.on_save(run=s, step=s.step, path=path)
        return path

    def save_model(self, model=None, metrics: dict | None = None, output_dir: Path | None = None,
                   tags: list[str] = ()) -> None:
        """Model (or LoRA adapter), tokenizer and model card in output_dir, loadable with from_pretrained: written
        to a temporary folder, then each file recorded in the folder's manifest and moved into place (a file alignkit
        did not write is never replaced: alignkit.engine.ownership)."""
        acc, out = self.accelerator, Path(output_dir or self.output_dir)
        model = model if model is not None else self.model
        self._check_finite_weights("the model")
        own = self.folder is not None and out.absolute() == self.output_dir.absolute()
        tmp = out / ".tmp-model"
        if acc.is_main_process:
            if own:
                self.folder.record(tmp, "tree")
            else:  # another folder: a .tmp-model of the user's there is refused, not removed
                files_in(out, [tmp.name], "output_dir")(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.unwrap_model(model).save_pretrained(tmp, is_main_process=acc.is_main_process,
                                                save_function=acc.save, state_dict=acc.get_state_dict(model))
        if acc.is_main_process:
            self.tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(self.config, self.method, metrics or {}, list(tags),
                                                      notes=self._record_notes))
            names = sorted(p.name for p in tmp.iterdir())
            record = (lambda path: self.folder.record(path)) if own else files_in(out, names, "output_dir")
            theirs = [n for n in names if own and ((out / n).exists() or (out / n).is_symlink())
                      and not self.folder.owns(out / n)]
            if theirs:
                raise ConfigError(f"train.output_dir: {out} holds {', '.join(theirs)} that alignkit did not write; "
                                  f"nothing was replaced: the model is in {tmp}")
            for name in names:
                record(out / name)
                os.replace(tmp / name, out / name)
            tmp.rmdir()
            if own:
                self.folder.forget(tmp)
        acc.wait_for_everyone()

    def record(self, path: Path) -> None:
        """Record a file about to be written into the run folder (or another folder) in that folder's manifest, so
        later runs know it as alignkit's; a file of the user's at that path is refused (alignkit.engine.ownership)."""
        path = Path(path)
        if self.folder is not None and path.absolute().parent == self.output_dir.absolute():
            if (path.exists() or path.is_symlink()) and not self.folder.owns(path):
                raise ConfigError(f"train.output_dir: {path} is not alignkit's; nothing was written over it")
            self.folder.record(path)
        else:
            files_in(path.parent, [path.name], "output_dir")(path)

    def _log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table(name, columns=columns, data=rows, step=self.state.step)


