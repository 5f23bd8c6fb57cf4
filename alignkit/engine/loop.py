"""The one training engine, on accelerate. It knows no method: the method's formatter makes the
batches and the method's loss turns a batch into loss terms and metrics; everything else is here.

`Engine(...)` only stores what it is given. `load()` checks the settings and the output folder and loads the
tokenizer, model, formatter, loss and reference; `setup()` adds the data, optimizer, loaders, schedule and, last,
the output folder (resume, config.yaml: the first write). `train()` is setup() and the loop; each optimizer step is
[rollout] -> counts -> reference -> loss -> backward per micro-batch.
"""

import atexit
import contextlib
import functools
import gc
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from alignkit.blocks.dropout import disable_dropout
from alignkit.config import RunConfig, environment_values, recorded, to_yaml
from alignkit.engine import checkpoint, hostmemory, hub, optim, preflight, resume, rundir
from alignkit.engine.ahead import RolloutsAhead
from alignkit.engine.evaluation import EvalStopped, evaluate_batches
from alignkit.engine.metrics import MetricSums, means, reduce_totals
from alignkit.engine.modelcard import model_card
from alignkit.engine.modeling import apply_peft, check_labels_of, kind_of, load_model, load_tokenizer
from alignkit.engine.ownership import files_in
from alignkit.engine.reference import Reference
from alignkit.engine.reporting import check_trackers, observers
from alignkit.engine.rundata import RunData
from alignkit.engine.schedule import Actions, Schedule
from alignkit.engine.signals import StopSignals
from alignkit.engine.state import Done, Prepared, RunState, Window
from alignkit.engine.vision import save_processing
from alignkit.errors import ConfigError, NonFiniteError
from alignkit.online.rollout import RolloutStage, build_rollout
from alignkit.plugin.context import StepContext, call
from alignkit.plugin.method import Method
from alignkit.plugins import RunHooks

log = logging.getLogger(__name__)
_EXIT_HOOK = False


def destroy_process_group_at_exit() -> None:
    """Tear the process group down when the process exits (once per process), while the interpreter is whole: left
    to its shutdown, the group (kept alive by reference cycles, e.g. the wrapped model's) is freed during
    finalization, its communication threads still running, and a process aborts ("terminate called without an
    active exception") after a run that succeeded, now and then."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(_destroy_process_group)
        _EXIT_HOOK = True


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the cycles that still hold the group (its C++ side outlives destroy_process_group otherwise)
        dist.destroy_process_group()
        gc.collect()  # the group itself: its worker threads are joined here, not in the interpreter's teardown


class Engine:
    """Build once per run; `train()` or `evaluate()` (each sets up what it needs). Model, tokenizer and datasets
    may be passed in."""

    def __init__(self, config: RunConfig, method: Method, pm, *, model=None, tokenizer=None,
                 train_dataset=None, eval_dataset=None, schedule: Schedule | None = None,
                 optimizer: Callable | None = None, lr_scheduler: Callable | None = None,
                 check_folder: bool = True, config_file: str | None = None) -> None:
        """Stores what it is given; nothing is checked, loaded or written before load()/setup()."""
        t = config.train
        self.config, self.method, self.pm = config, method, pm
        self.config_file = config_file  # the -c file: a run never removes or replaces it (alignkit.engine.ownership)
        self.check_folder = check_folder  # training: a folder it may not write or clean is refused before any work
        self.model, self.tokenizer, self._given_data = model, tokenizer, (train_dataset, eval_dataset)
        self.output_dir = Path(t.output_dir)
        # optimizer(model) and lr_scheduler(optimizer, num_training_steps) replace train.optim / lr_scheduler_type;
        # a Schedule replaces when the loop logs, evaluates, checkpoints and stops (alignkit.engine.schedule)
        self.schedule = schedule or Schedule(t)
        self.make_optimizer = optimizer or functools.partial(optim.build_optimizer, train=t)
        self.make_scheduler = lr_scheduler or (lambda opt, num_training_steps:
                                               optim.schedule(t, opt, num_training_steps))
        self.signals = StopSignals(self.checkpoint_root, lambda: self.state.step)
        self.accelerator = self.state = self.rollout = None  # load() makes these and the next line's
        self.formatter = self.collate_fn = self.loss = self.reference = self.data = self.hooks = None
        self.generator = None  # the generation handle of online methods (StepContext.generator)
        self.resume_path = None  # the checkpoint train() resumes from (resume.check)
        self.lock, self.folder, self.notes = None, None, []  # the output folder's, once setup() took it (resume.start)
        # the step whose evaluation a stop request cut short (saved with its checkpoint), and the step at which a
        # resumed run redoes such an evaluation first (not repeated at the end)
        self.eval_cut_at: int | None = None
        self.eval_redo_at: int | None = None
        self.prepared: Prepared | None = None  # what setup() made for the loop
        self.hub: hub.HubPush | None = None  # train.push_to_hub: the pushes' worker (alignkit.engine.hub)

    # ---- setup: every check that can refuse comes before the first write (resume.start) --------------

    def load(self) -> "Engine":
        """Check the settings and the output folder, then load the tokenizer, model (and LoRA), formatter, loss,
        reference and data handling: what a caller may look at before training. Nothing is written. Runs once."""
        if self.state is None:
            self._setup_accelerator()
            self._setup_folder_checks()
            self._setup_model()
            self._setup_method()
        return self

    def setup(self) -> Prepared:
        """load(), then everything train() needs: the checkpoint to resume checked, the data formatted and checked,
        optimizer, reference outputs, loaders, schedule, and last the output folder taken (the first write)."""
        if self.prepared is None:
            self.load()
            self.resume_path = resume.check(self)  # refused before any work: nothing loaded into it yet
            data = self._setup_data()
            optimizer = self._setup_optimizer()
            data = self._precompute_reference(data)
            model, optimizer, train_dl = self._setup_training(data["train"], optimizer)
            eval_dl = self._eval_loader(data["eval"]) if "eval" in data else None
            self.state.eval_dataset = data.get("eval")
            scheduler = self._setup_schedule(optimizer, train_dl)
            window = self._setup_resume(scheduler)
            self.prepared = Prepared(model, optimizer, scheduler, train_dl, eval_dl, window)
        return self.prepared

    def _setup_accelerator(self) -> None:
        t = self.config.train
        check_trackers(t.report_to)
        hub.check(t)
        preflight.check_settings(self.config, self.method, eval_given=self._given_data[1] is not None)
        if t.release_host_memory:  # before the model loads: its tensors too (alignkit.engine.hostmemory)
            hostmemory.mmap_large_tensors()
        # accelerate keeps precision settings process-wide; each run (a notebook may start several) sets
        # its own. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        cpu = t.use_cpu or not torch.accelerator.is_available()
        if cpu and not t.use_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # DeepSpeed on CPUs: accelerate drops DeepSpeed for cpu=True, and without it counts one process; with
            # gloo named it keeps DeepSpeed's process group (its CPU accelerator)
            PartialState(cpu=False, backend="gloo")
            cpu = False
        self.accelerator = Accelerator(
            # Without cpu=True accelerate ignores torchrun's process group on a machine with no accelerator.
            cpu=cpu,
            mixed_precision="bf16" if t.bf16 else "fp16" if t.fp16 else "no",
            log_with=t.report_to or None, project_dir=t.output_dir,
        )
        if self.accelerator.num_processes > 1:
            destroy_process_group_at_exit()
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and t.gradient_accumulation_steps > 1:
            # accelerate steps DeepSpeed's optimizer in every backward (the loop accumulates micro-batches itself)
            raise ConfigError(f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} under DeepSpeed: "
                              "its optimizer would step after every micro-batch, not once per batch; use 1 with a "
                              "larger train.per_device_train_batch_size, or DDP/FSDP for accumulation")

    def _setup_folder_checks(self) -> None:
        """Before any work: nothing is loaded for a run that cannot write (or, training, may not clean) its folder."""
        rundir.check_writable(self.output_dir)
        rundir.Lock.probe(self.output_dir)
        if self.check_folder:
            resume.precheck(self)

    def _setup_model(self) -> None:
        """Tokenizer, the rollout (online methods; checks the rewards), model, LoRA; the model checked."""
        config, seed = self.config, self.config.train.seed
        set_seed(seed)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(config.model)
        rollout = build_rollout(self.method, config, self.tokenizer, self.pm)  # alignkit.online.rollout
        self.rollout = RolloutStage(rollout) if rollout is not None else None
        if self.model is None:  # what a LoRA adapter records as its base: a path from ${oc.env:...} stays unwritten
            self.model = load_model(config.model, self.tokenizer, seed, self.method.model_kind,
                                        self.method.num_labels)
            self.model.name_or_path = recorded(config).model.name_or_path
        else:
            check_labels_of(self.model, self.method.model_kind, self.method.name, self.method.num_labels)
        if config.model.peft is not None:
            self.model = apply_peft(self.model, config.model.peft)
        if getattr(config.method, "disable_dropout", False):  # TRL's trainers' setting: LoRA's dropout included
            disable_dropout(self.model)
        preflight.check_model(config, self.model, self.tokenizer)

    def _setup_method(self) -> None:
        """The method's formatter and loss (each may prepare the model), the reference, run state, data, hooks."""
        config, method = self.config, self.method
        self.formatter = method.formatter(config.method, self.tokenizer)
        self.formatter.prepare_model(self.model)
        self.collate_fn = self.formatter.collate
        self.loss = method.loss(config.method)
        self.loss.prepare_model(self.model)
        self.reference = Reference(self.loss, self.model, config, self.tokenizer, self.accelerator)
        self.state = RunState(config, method, self.output_dir, self.accelerator.is_main_process,
                              self.model, self.tokenizer, log_table=self._log_table)
        self.data = RunData(config, self.formatter, self.collate_fn, self.accelerator, self.pm, self.state.data,
                            *self._given_data)
        self.hooks = RunHooks(self.pm, method)  # lifecycle hooks scoped to this method's plugin (docs/hooks.md)

    def _setup_data(self) -> dict:
        """The formatted train and eval sets; the trainable parameters (train.optim) and token ids checked."""
        if isinstance(self.make_optimizer, functools.partial):  # train.optim, not an optimizer passed in
            preflight.check_trainable(self.model, self.config.train.optim)
        data = self.data.formatted(need_train=True)
        preflight.check_ids(self.collate_fn, data["train"], self.model, self.config.method)
        return data

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        """Gradient checkpointing if asked, then the optimizer passed in or train.optim (alignkit.engine.optim)."""
        if self.config.train.gradient_checkpointing:
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
        train_dl = self.data.loader(train_ds, self.config.train.per_device_train_batch_size,
                                    shuffle=self.config.train.shuffle)
        model, optimizer, train_dl = self.accelerator.prepare(self.model, optimizer, train_dl)
        self._attach_generator(model)
        return model, optimizer, train_dl

    def _attach_generator(self, model) -> None:
        """Online methods sample from the prepared policy through the core's generation handle."""
        if self.rollout is not None:
            self.generator = self.rollout.attach(model, self.accelerator, self.tokenizer, self.config.train.seed,
                                                 self.reference.for_generation(model), self.config.generation)
            if self.rollout.max_staleness > 0:  # async rollouts: sampled ahead in a worker thread
                self.rollout.ahead = RolloutsAhead(self.rollout, self.rollout.max_staleness, model, self.accelerator,
                                                   self.tokenizer, self.config.train.seed)

    def _setup_schedule(self, optimizer, train_dl):
        """The run's length in steps and the learning-rate schedule over it."""
        self.state.batches_per_epoch = len(train_dl)
        passes = self.rollout.iterations if self.rollout is not None else 1
        self.state.max_steps = optim.max_steps(self.config.train, len(train_dl), passes)
        return self.make_scheduler(optimizer, num_training_steps=self.state.max_steps)

    def _setup_resume(self, scheduler) -> Window:
        """The output folder's lock, the checkpoint loaded, config.yaml written (alignkit.engine.resume); the
        logging window to continue."""
        started = resume.start(self, scheduler)
        self.lock, self.folder, self.notes = started.lock, started.folder, started.notes
        if self.config.train.push_to_hub:  # after the first write: the folder is the run's
            self.hub = hub.HubPush(self.config.train, self.output_dir, self.config.train.checkpoint_dir,
                                   self.accelerator.is_main_process)
            self.pm.register(self.hub)  # its on_train_end pushes the finished run folder
        if started.resumed is not None:
            started.resumed.apply(self.state)
            self.loss.load_state_dict(started.resumed.loss_state)
            if self._ahead is not None:
                self._ahead.restore(started.resumed.path)
            self.eval_redo_at = started.resumed.step if started.resumed.eval_pending else None
        return started.window

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

    # ---- training: the loop and one step --------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """setup() (every refusal before the first write), then the loop; the final log row and eval metrics."""
        run = self.setup()
        try:
            with self._observers(), self.signals.installed():
                return self._loop(run)
        finally:
            self._release()

    def _loop(self, run: Prepared) -> dict[str, float]:
        state, hooks, model, done = self.state, self.hooks, run.model, Done(run.window)
        hooks.on_train_start(run=state)  # the schedule says when to log, evaluate, checkpoint and stop
        self._do(self.schedule.at_start(state), done, run)
        if self.eval_redo_at is not None and run.eval_dl is not None:  # resumed from a stop during an evaluation
            done.eval = self._evaluate_and_report(model, run.eval_dl)
        self._stop_if_asked(done.window)  # asked during that evaluation: stop before the first step
        model.train()
        for micro_batches in self._windows(run):
            loss, totals, grad_norm = self._optimizer_step(run, micro_batches)
            state.step += 1
            self.reference.after_step(model, state.step)  # a reference synced with the policy (Loss.reference_sync)
            done.window.add(loss, grad_norm, totals, len(micro_batches))
            hooks.on_step_end(run=state, step=state.step, metrics={"loss": loss, **means(totals)})
            stop = self._do(self.schedule.after_step(state), done, run)
            if state.batches_in_epoch == state.batches_per_epoch and self._between_rollouts():  # it ended an epoch
                stop |= self._do(self.schedule.after_epoch(state), done, run)
            if stop or state.step >= state.max_steps:
                break
            self._stop_if_asked(done.window)
        self._do(end := self.schedule.at_end(state), done, run)
        self._stop_at_the_end(done.window, saved_model=False)
        self._report_skipped_steps()
        if end.save_model:
            self.save_model(model, done.final)
            self._stop_at_the_end(done.window, saved_model=True)
        hooks.on_train_end(run=state, metrics=done.final)
        return done.final

    def _do(self, act: Actions, done: Done, run: Prepared) -> bool:
        """Carry out what the schedule asked for (True: stop after this step)."""
        if act.log and done.window.steps:
            done.logs, done.window = self._reduce_window(done.window, run.scheduler), Window()
            self.hooks.on_log(run=self.state, step=self.state.step, logs=done.logs)
        if act.evaluate and run.eval_dl is not None and self.eval_redo_at != self.state.step:
            done.eval = self._evaluate_and_report(run.model, run.eval_dl)
        if act.checkpoint and self._between_rollouts():
            self._save_checkpoint(done.window)
        return act.stop

    def _optimizer_step(self, run: Prepared, micro_batches: list) -> tuple[float, dict, float]:
        """(global loss, this process's metric (sum, count) totals, gradient norm); NaN/inf never reach the weights."""
        acc, model, ctxs = self.accelerator, run.model, self._contexts(len(micro_batches))
        if self.rollout is not None:  # online methods: each batch of prompt rows -> the batch the loss sees
            micro_batches = self.rollout(micro_batches, ctxs)
        loss_sum, metrics = self.accumulate_gradients(model, micro_batches, ctxs)
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), self.config.train.max_grad_norm or float("inf")))
        loss, totals = acc.reduce(loss_sum, "sum").item(), metrics.totals()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._refuse_nonfinite(loss, grad_norm)
        else:
            run.optimizer.step()
            preflight.check_update(model, acc, self.state.step + 1, loss, grad_norm)
            run.scheduler.step()
            totals.update(self._after_update(totals))
        run.optimizer.zero_grad(set_to_none=True)
        return loss, totals, grad_norm

    def _after_update(self, totals: dict) -> dict:
        """After the weights moved: the rollout's and the loss's own step ends (Loss.after_step may move a controller
        the loss keeps and return metrics for the step)."""
        if self.rollout is not None:
            self.rollout.after_step()
        return self.loss.after_step(totals, self._context(True, 0, 1)) or {}

    def accumulate_gradients(self, model, micro_batches: list, ctxs=None) -> tuple[torch.Tensor, MetricSums]:
        """Reference, loss and backward over each micro-batch (no optimizer step), every loss term divided by its
        count over all of them and all processes (_count_units); this process's loss sum and metric sums."""
        acc = self.load().accelerator
        ctxs = ctxs or self._contexts(len(micro_batches))
        totals = self._count_units(micro_batches, ctxs)
        loss_sum, metrics = torch.zeros((), device=acc.device), MetricSums(acc.device)
        for i, (batch, ctx) in enumerate(zip(micro_batches, ctxs)):
            with contextlib.nullcontext() if i == len(micro_batches) - 1 else acc.no_sync(model):
                with acc.autocast():
                    out = self._loss(model, batch, ctx)
                loss = out.normalized(totals)
                acc.backward(loss * acc.num_processes)  # DDP averages over processes; the totals span them already
            loss_sum += loss.detach()
            metrics.add(out.metrics)
        return loss_sum, metrics

    def _report_skipped_steps(self) -> None:
        if self.state.skipped_steps:
            log.warning("%d of %d steps were skipped for a non-finite loss or gradient", self.state.skipped_steps,
                        self.state.step)

    def _windows(self, run: Prepared):
        """Each optimizer step's micro-batches from the resume point: looked ahead for async rollouts
        (alignkit.engine.ahead), each repeated for a rollout's optimisation passes."""
        if self._ahead is not None:
            windows = self._ahead.windows(self.data.step_batches, run.train_dl, self.state, self._contexts)
        else:
            windows = self.data.step_batches(run.train_dl, self.state)
        return self.rollout.windows(windows) if self.rollout is not None else windows

    def _release(self) -> None:
        """The end of train(), however it ends: the rollout worker stopped, the output folder's lock released."""
        if self._ahead is not None:
            self._ahead.close()
        if self.hub is not None:
            self.pm.unregister(self.hub)
            self.hub.close()
        self.lock.release()

    @property
    def _ahead(self):
        """The async rollouts (alignkit.engine.ahead), when the rollout samples ahead."""
        return getattr(self.rollout, "ahead", None)

    def _between_rollouts(self) -> bool:
        """No rollout waits for more optimisation passes (checkpoints are written only here)."""
        return self.rollout is None or self.rollout.between_rollouts

    def _stop_if_asked(self, window: Window) -> None:
        if self._between_rollouts():
            self.signals.stop_if_asked(self.accelerator, lambda: self._save_checkpoint(window))

    def _stop_at_the_end(self, window: Window, saved_model: bool) -> None:
        self.signals.stop_at_the_end(self.accelerator, lambda: self._save_checkpoint(window),
                                     self.output_dir if saved_model else None)

    # ---- what one step is made of ------------------------------------------------------------------

    def _context(self, training: bool, index: int, count: int) -> StepContext:
        acc = self.accelerator
        return StepContext(training, self.state.step, index, count, acc.num_processes, acc.process_index,
                           acc.device, self.generator, acc.reduce)

    def _contexts(self, count: int) -> list[StepContext]:
        """The training contexts of one step's `count` micro-batches."""
        return [self._context(True, i, count) for i in range(count)]

    def _refuse_nonfinite(self, loss: float, grad_norm: float) -> None:
        """A NaN/inf loss or gradient: the run stops naming the step, or (train.skip_nonfinite_steps) the step is
        skipped, warned once; later ones at debug level, and their number at the end of training."""
        step = self.state.step + 1
        if not self.config.train.skip_nonfinite_steps:
            raise NonFiniteError(f"step {step}: loss {loss}, gradient norm {grad_norm}; no weights were changed. "
                                 "Lower the learning rate, check the data, or set train.skip_nonfinite_steps=true")
        (log.debug if self.state.skipped_steps else log.warning)(
            "step %d: loss %s, gradient norm %s; step skipped (train.skip_nonfinite_steps; later skips are "
            "counted and reported at the end)", step, loss, grad_norm)
        self.state.skipped_steps += 1

    def _loss(self, model, batch: dict, ctx: StepContext):
        ref = self.reference(model, batch, ctx)
        return call(self.loss, model, batch, ctx=ctx, **({} if ref is None else {"ref": ref}))

    def _count_units(self, micro_batches, ctxs) -> dict[str, float]:
        """The loss's counts of this step, summed over its micro-batches and all processes: what each summed loss
        term is divided by. Each context gets them (a fused LM head weights its terms so); the run's `seen` grows."""
        counts: Counter = Counter()
        for batch, ctx in zip(micro_batches, ctxs):
            counts.update(call(self.loss.counts, batch, ctx=ctx))
        units, acc = sorted(counts), self.accelerator
        summed = acc.reduce(torch.tensor([counts[u] for u in units], device=acc.device), "sum")
        totals = {u: float(c) for u, c in zip(units, summed.tolist())}
        for ctx in ctxs:
            ctx.totals = totals
        for unit, count in totals.items():
            self.state.seen[unit] = self.state.seen.get(unit, 0.0) + count
        return totals

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
        self.load()
        if eval_dataset is not None:
            self.data.raw["eval"] = eval_dataset
        ds = self.data.formatted(need_train=False)["eval"]
        self.state.eval_dataset = ds
        model = self.accelerator.prepare(self.model)
        self._attach_generator(model)
        return self._evaluate_and_report(model, self._eval_loader(ds))

    def eval_batches(self) -> DataLoader:
        """The eval set formatted and collated in order, as this process sees it (for custom eval loops)."""
        ds = self.load().data.formatted(need_train=False)["eval"]
        return self.data.loader(ds, self.config.train.per_device_eval_batch_size, shuffle=False)

    @property
    def lockstep(self) -> bool:
        """Every process must run every eval forward: sharded models, and losses that reduce across processes."""
        self.load()
        return self.loss.collective or self.accelerator.distributed_type in (
            DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)

    def _eval_loader(self, ds) -> DataLoader:
        """Eval batches split over processes without repeating samples to even them out (accelerate's
        default), so several processes see exactly the batches one process sees. In lock-step (sharded
        models, collective losses) accelerate's even batches stay."""
        acc = self.accelerator
        even, acc.even_batches = acc.even_batches, self.lockstep
        try:
            return acc.prepare(self.data.loader(ds, self.config.train.per_device_eval_batch_size, shuffle=False))
        finally:
            acc.even_batches = even

    def _evaluate_and_report(self, model, eval_dl) -> dict[str, float]:
        if self._ahead is not None:
            self._ahead.wait()  # the worker idle while the evaluation samples
        if not self.lockstep:  # uneven batch counts per process: no collective may run in the forward
            model = self.accelerator.unwrap_model(model)
        context = functools.partial(self._context, False)
        rollout = self.rollout.evaluate if self.rollout is not None else None
        try:
            metrics = evaluate_batches(model, eval_dl, self.loss, self._loss, context, self.accelerator, rollout,
                                       stop=lambda: self.signals.asked)
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
                 "loss_state": self.loss.state_dict(),
                 "environment": environment_values(self.config), "eval_pending": self.eval_cut_at == s.step}
        self._check_finite_weights("a checkpoint")
        path = checkpoint.save(self.accelerator, self.checkpoint_root, s.step, saved,
                               self.config.train.save_total_limit, self.prepared.scheduler,
                               files={checkpoint.CONFIG_FILE: to_yaml(self.config, comments=False)}, folder=self.folder,
                               process_files=self._ahead.saved() if self._ahead is not None else None)
        self.hooks.on_save(run=s, step=s.step, path=path)
        if self.hub is not None:
            self.hub.at_save(self, path, s.step)
        return path

    def save_model(self, model=None, metrics: dict | None = None, output_dir: Path | None = None,
                   tags: list[str] = ()) -> None:
        """Model (or LoRA adapter), tokenizer and model card in output_dir, loadable with from_pretrained: written
        to a temporary folder, then each file recorded in the folder's manifest and moved into place (a file alignkit
        did not write is never replaced: alignkit.engine.ownership)."""
        acc, out = self.accelerator, Path(output_dir or self.output_dir)
        model = model if model is not None else self.load().model
        self._check_finite_weights("the model")
        own = self.folder is not None and out.absolute() == self.output_dir.absolute()
        tmp = out / ".tmp-model"
        if acc.is_main_process:
            if own:
                self.folder.record(tmp, "tree")
            else:  # another folder: a .tmp-model of the user's there is refused, not removed
                files_in(out, [tmp.name], "output_dir")(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)  # before the other processes' save_pretrained, which lists it
        acc.wait_for_everyone()
        acc.unwrap_model(model).save_pretrained(tmp, is_main_process=acc.is_main_process,
                                                save_function=acc.save, state_dict=acc.get_state_dict(model))
        acc.wait_for_everyone()  # every process is done with tmp before the main one empties it
        if acc.is_main_process:
            save_processing(self.tokenizer, tmp)  # a vision-language model's processor too
            kind = "image-text-to-text" if kind_of(acc.unwrap_model(model)) == "image-text-to-text" else None
            (tmp / "README.md").write_text(model_card(self.config, self.method, metrics or {}, list(tags),
                                                      notes=self.notes, kind=kind))
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


