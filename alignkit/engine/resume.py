"""What a resumed run checks: the config it resumes with against the one the checkpoint was made with,
and what a crash may have left in metrics.jsonl.

Keys that only change what is logged, saved or shown may change on resume; the change is recorded in
config.yaml (a comment line per resume) and the model card. Any other difference is refused, naming
the keys: the optimizer, scheduler and data position in the checkpoint belong to the old values.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.config import RunConfig, environment_values, to_yaml
from alignkit.engine import checkpoint, ownership, rundir
from alignkit.engine.state import Window
from alignkit.errors import ConfigError

log = logging.getLogger(__name__)

#: keys a resumed run may change: they do not touch the optimisation or the order of the training data
CHANGEABLE = frozenset({
    "train.output_dir", "train.overwrite_output_dir", "train.resume_from_checkpoint", "train.save_steps",
    "train.save_total_limit", "train.logging_steps", "train.logging_first_step", "train.eval_steps",
    "train.eval_on_start", "train.report_to", "train.run_name", "train.disable_tqdm", "train.plots",
    "train.dataloader_num_workers", "train.per_device_eval_batch_size", "train.skip_nonfinite_steps",
    "train.gradient_checkpointing", "data.eval", "data.eval_split", "data.max_eval_samples",
    # where and how the run is pushed to the hub (alignkit.engine.hub)
    "train.push_to_hub", "train.hub_model_id", "train.hub_strategy", "train.hub_private_repo", "train.hub_always_push",
    "train.hub_endpoint",
    # where the generation server is and how long to wait for it; memory settings of colocated vLLM
    "generation.server_host", "generation.server_port", "generation.server_timeout", "generation.server_chunk_mb",
    "generation.gpu_memory_utilization", "generation.enable_sleep_mode",
    # how a remote reward's server is waited for (not what it scores)
    "rewards.remote_timeout", "rewards.remote_retries", "rewards.remote_backoff", "rewards.remote_concurrency",
})
#: the comment lines config.yaml carries for each resume with changed settings
NOTE_PREFIX = "# resumed "


def _flat(tree) -> dict:
    """section.key -> value; a dict-valued setting (lr_scheduler_kwargs, init_kwargs, peft) is one value, so a key
    added to it or removed from it is a difference."""
    return {f"{section}.{key}": value for section, keys in (tree or {}).items() for key, value in (keys or {}).items()}


def differences(saved_yaml: str, config: RunConfig) -> dict[str, tuple]:
    """key -> (saved, now) for every key whose value differs (settings only one side has, e.g. from another
    alignkit version, are ignored)."""
    saved, now = _flat(yaml.safe_load(saved_yaml)), _flat(yaml.safe_load(to_yaml(config, comments=False)))
    return {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]}


def same_run(saved_yaml: str, config: RunConfig) -> bool:
    """Whether config.yaml holds this very config (resume and overwrite switches aside)."""
    try:
        diff = differences(saved_yaml, config)
    except yaml.YAMLError:
        return False
    return not set(diff) - {"train.resume_from_checkpoint", "train.overwrite_output_dir"}


def saved_config(checkpoint: Path) -> str | None:
    """The config a checkpoint was made with: its own copy, or (older checkpoints) its run's config.yaml."""
    for path in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if path.is_file():
            return path.read_text()
    return None


def check_config(checkpoint: Path, config: RunConfig) -> list[str]:
    """Refuse a resume whose config differs in a key that cannot change mid-run; the allowed changes."""
    text = saved_config(checkpoint)
    if text is None:
        log.warning("train.resume_from_checkpoint: %s has no saved config to compare with; resuming unchecked",
                    checkpoint)
        return []
    diff = differences(text, config)
    fixed = {k: v for k, v in diff.items() if k not in CHANGEABLE}
    if fixed:
        shown = ", ".join(f"{k} ({json.dumps(a)} -> {json.dumps(b)})" for k, (a, b) in fixed.items())
        raise ConfigError(f"train.resume_from_checkpoint: {checkpoint} was made with other settings that cannot change "
                          f"mid-run: {shown}; resume with the saved values, or start a new run in another output_dir")
    return [f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diff.items()
            if k not in ("train.resume_from_checkpoint", "train.overwrite_output_dir")]


def check_environment(checkpoint: Path, saved: dict[str, str], config: RunConfig) -> None:
    """Keys given through `${oc.env:...}` are recorded as the interpolation: compare the values they resolved to
    (hashed in the checkpoint) and refuse one that cannot change mid-run."""
    now = environment_values(config, saved)
    changed = [k for k, digest in saved.items() if k in now and now[k] != digest and k not in CHANGEABLE]
    if changed:
        shown = ", ".join(f"{k} ({config._recorded[k]})" for k in changed)
        raise ConfigError(f"train.resume_from_checkpoint: {checkpoint} was made with other values from the environment "
                          f"for settings that cannot change mid-run: {shown}; resume with the environment it was made "
                          "with, or start a new run in another output_dir")


def notes_of(config_yaml: Path) -> list[str]:
    """The resume notes an existing config.yaml carries."""
    if not config_yaml.is_file():
        return []
    return [line for line in config_yaml.read_text().splitlines() if line.startswith(NOTE_PREFIX)]


def repair_metrics(path: Path) -> None:
    """Drop a torn last line (a kill in the middle of a write); any other bad line is an error."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            if i != len(lines) - 1:
                raise ConfigError(f"{path}:{i + 1}: not valid JSON ({e.msg}); fix or remove the line to resume"
                                  ) from None
            log.warning("%s: dropping the half-written last line %d", path, i + 1)
            path.write_text("".join(ln + "\n" for ln in lines[:i]))


# ---- taking the output folder and resuming (called by the engine before training starts) -------------

def run_folder(engine) -> ownership.RunFolder:
    t = engine.config.train
    tracker = (t.run_name or engine.output_dir.name) if t.report_to else None
    return ownership.RunFolder(engine.output_dir, engine.checkpoint_root, tracker)


def _read_files(engine) -> dict[str, str | None]:
    """The files the run reads that may lie in its output_dir: the -c config, the data files."""
    data = engine.config.data
    return {"-c": getattr(engine, "config_file", None), "data.train": data.train, "data.eval": data.eval}


def precheck(engine) -> None:
    """Before any work (nothing written): refuse a folder this run may not write or clean (alignkit.engine.ownership).
    Every process checks (it only reads), so every process refuses alike."""
    t = engine.config.train
    spec, root = t.resume_from_checkpoint, engine.checkpoint_root
    if spec is None:
        own = False
    elif spec == "auto":
        own = bool(checkpoint.checkpoints(root))
    else:
        own = Path(spec).resolve().parent == root.resolve()
    folder = run_folder(engine)
    folder.check(clean=not own, overwrite=t.overwrite_output_dir, files=_read_files(engine))
    if spec is None or not own and spec == "auto":  # a fresh run: refused before its data is tokenized
        _refuse_results(folder, engine.config)


def _refuse_results(folder: ownership.RunFolder, config: RunConfig) -> None:
    """A fresh run never replaces an earlier run's results (model, checkpoints) without overwrite_output_dir."""
    if not folder.results() or config.train.overwrite_output_dir:
        return
    saved = folder.out / "config.yaml"  # the same config again too: its model or checkpoints stay
    same = saved.is_file() and not saved.is_symlink() and same_run(saved.read_text(), config)
    what = "an earlier run of this same config" if same else "another run"
    raise ConfigError(f"train.output_dir: {folder.out} is not empty and holds {what}; continue it with "
                      "train.resume_from_checkpoint=auto, write over it with train.overwrite_output_dir=true, "
                      "or choose another output_dir")


@dataclass
class Resumed:
    """Where a resumed run continues: its checkpoint, position in the data, counts and open logging window."""

    path: Path
    step: int
    epoch_index: int
    batches_in_epoch: int
    seen: dict[str, float]
    window: Window
    #: a stop request cut the evaluation of this step short: the resumed run redoes it first
    eval_pending: bool
    #: what the loss kept across steps (Loss.state_dict)
    loss_state: dict = field(default_factory=dict)

    def apply(self, state) -> None:
        """Move the run's state (alignkit.engine.state.RunState) to where the checkpoint was made."""
        state.resumed_from, state.step, state.epoch_index = self.path, self.step, self.epoch_index
        state.batches_in_epoch, state.seen = self.batches_in_epoch, dict(self.seen)


@dataclass
class Started:
    """What start() took and found: the folder's lock (the caller releases it when the run ends), the run folder,
    the resume notes config.yaml carries (for the model card), and the checkpoint resumed (None: a fresh run)."""

    lock: rundir.Lock
    folder: ownership.RunFolder
    notes: list[str]
    resumed: Resumed | None

    @property
    def window(self) -> Window:
        """The logging window to continue."""
        return self.resumed.window if self.resumed is not None else Window()


def start(engine, scheduler) -> Started:
    """Lock the output folder, resume if asked (checkpoint verified and loaded into the prepared model, optimizer
    and `scheduler`, config compared), make the folder this run's (its manifest first) and write config.yaml. The
    lock is released (its file and a folder this run created removed) if anything here refuses."""
    lock = rundir.Lock(engine.output_dir)
    try:
        on_main(engine.accelerator, lock.acquire)
        folder = run_folder(engine)
        resumed, changes = _resume(engine, scheduler)
        notes = on_main(engine.accelerator, lambda: _take_folder(engine, folder, resumed, changes))
    except BaseException:
        lock.release(discard_folder=True)
        raise
    return Started(lock, folder, notes or [], resumed)


def on_main(accelerator, fn):
    """fn() on the main process only; its result, or its ConfigError, reaches every process."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = fn()
        except ConfigError as e:
            box[1] = str(e)
    broadcast_object_list(box)
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]


def check(engine) -> Path | None:
    """What about the checkpoint can be refused before any work (nothing loaded, tokenized or written): the
    checkpoint to resume (found, verified, its owner and config compared, its step within train.max_steps), for
    start(). The folder itself is checked by precheck()."""
    spec, out, config = engine.config.train.resume_from_checkpoint, engine.output_dir, engine.config
    path = on_main(engine.accelerator, lambda: checkpoint.find(spec, engine.checkpoint_root)) if spec else None
    if path is None:
        if spec == "auto":
            log.info("train.resume_from_checkpoint=auto: no checkpoint in %s yet, starting fresh", out)
        return None
    own = path.resolve().parent == engine.checkpoint_root.resolve()
    if not own and run_folder(engine).results():
        raise ConfigError(f"train.resume_from_checkpoint: {path} belongs to another run than train.output_dir {out}, "
                          f"which holds a run of its own; resume into {path.parent.parent} or an empty output_dir")
    check_config(path, config)
    step = checkpoint.read_state(path)["step"]
    if 0 < config.train.max_steps < step:
        raise ConfigError(f"train.resume_from_checkpoint: {path} is at step {step}, past this run's train.max_steps="
                          f"{config.train.max_steps}; resume with that run's settings or start a new run")
    return path


def _resume(engine, scheduler) -> tuple[Resumed | None, list[str]]:
    """The checkpoint found by check() loaded (accelerate state, scheduler), checked against this run; the
    allowed setting changes."""
    path = engine.resume_path  # found and checked by check() before any work
    if path is None:
        return None, []
    changes = check_config(path, engine.config)
    saved = checkpoint.load(engine.accelerator, path, scheduler)
    check_environment(path, saved.get("environment", {}), engine.config)
    if saved["max_steps"] != engine.state.max_steps:
        raise ConfigError(f"train.resume_from_checkpoint: {path} was made for {saved['max_steps']} steps, "
                          f"this run has {engine.state.max_steps}; keep the data and step settings of that run")
    log.info("resumed from %s at step %d", path, saved["step"])
    return Resumed(path, saved["step"], saved["epoch_index"], saved["batches_in_epoch"], dict(saved.get("seen", {})),
                   Window.from_state(saved["window"]), bool(saved.get("eval_pending")),
                   dict(saved.get("loss_state", {}))), changes


def _take_folder(engine, folder: ownership.RunFolder, resumed: Resumed | None, changes: list[str]) -> list[str]:
    """Refuse a folder holding another run's results or files alignkit did not write (alignkit.engine.ownership); a
    fresh run removes only what alignkit wrote there; config.yaml records the config (and, on resume, the changed
    settings). The resume notes config.yaml now carries."""
    config, out = engine.config, engine.output_dir
    config_text = to_yaml(config, comments=False)
    own = resumed is not None and resumed.path.resolve().parent == engine.checkpoint_root.resolve()
    folder.check(clean=not own, overwrite=config.train.overwrite_output_dir, files=_read_files(engine))
    notes = []
    if resumed is None:
        _refuse_results(folder, config)
    removed = folder.claim(clean=not own)
    if removed:
        kept = folder.manifest.foreign()
        log.warning("%s: starting over; removing what alignkit wrote there: %s%s", out, ", ".join(removed),
                    f" (keeping {len(kept)} files it did not write)" if kept else "")
    if own:
        repair_metrics(out / "metrics.jsonl")
        notes = notes_of(out / "config.yaml")
        if changes:
            notes.append(f"{NOTE_PREFIX}at step {resumed.step} from {resumed.path.name} with changed settings: "
                         f"{'; '.join(changes)}")
            log.warning("resuming with changed settings (recorded in config.yaml): %s", "; ".join(changes))
    for name in (".config.yaml.tmp", "config.yaml", "metrics.jsonl"):  # config.yaml is renamed into place
        folder.record(out / name)
    if folder.tracker_dir:
        folder.record(out / folder.tracker_dir, "tree")
    rundir.write_text(out / "config.yaml", "".join(n + "\n" for n in notes) + config_text)
    return notes
