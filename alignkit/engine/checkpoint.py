"""Checkpoints (checkpoint-N folders under output_dir/train.checkpoint_dir): written atomically with a manifest
(sizes and hashes) written last, verified before use, found for `auto` (the newest intact one), rotated. The
engine's own state is alignkit_state.json: trainer_state.json is left to tools that write transformers'
TrainerState (the TRL-compatible trainer does).
"""

import ast
import contextlib
import hashlib
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from alignkit.errors import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "alignkit_state.json"
SCHEDULER_FILE = "scheduler.pt"
CONFIG_FILE = "config.yaml"
MANIFEST = "manifest.json"
REQUIRED = (STATE_FILE, SCHEDULER_FILE)
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and SHA-256 of every file of the checkpoint; written last, so its presence means complete."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.rename(folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it (one phrase)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (not a complete alignkit checkpoint)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is damaged"
    for name in REQUIRED:
        if name not in files:
            return f"no {name}"
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickled:
        return f"it holds pickled weights ({', '.join(pickled)}); alignkit loads safetensors only"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, {want['size']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} differs from what was written"
    try:
        return state_problem(read_state(folder))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {STATE_FILE} is not valid JSON"


#: what alignkit_state.json must hold: a non-negative integer step and data position, the run's length, the window
_STATE_INTS = ("step", "epoch_index", "batches_in_epoch", "max_steps")
_WINDOW_NUMBERS = ("loss", "grad_norm", "steps", "micro_batches")


def state_problem(state) -> str | None:
    """None if `state` (alignkit_state.json, parsed) can be resumed from, else what is wrong with it."""
    if not isinstance(state, dict):
        return f"its {STATE_FILE} holds {type(state).__name__ if state is not None else 'null'}, not an object"
    missing = [k for k in (*_STATE_INTS, "window") if k not in state]
    if missing:
        return f"its {STATE_FILE} lacks {', '.join(missing)}"
    for key in _STATE_INTS:
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"its {STATE_FILE} has {key} {json.dumps(value)}, not a count"
    if state["step"] > state["max_steps"]:
        return f"its {STATE_FILE} has step {state['step']}, past its max_steps {state['max_steps']}"
    window = state["window"]  # older versions wrote fewer sums: those present must be numbers
    if not isinstance(window, dict) or not isinstance(window.get("metrics", {}), dict) or not all(
            isinstance(window[k], int | float) and not isinstance(window[k], bool) for k in _WINDOW_NUMBERS
            if k in window):
        return f"its {STATE_FILE} has a damaged window (the sums since the last log)"
    for key in ("seen", "environment", "loss_state"):
        if not isinstance(state.get(key, {}), dict):
            return f"its {STATE_FILE} has {key} {json.dumps(state[key])}, not an object"
    return None


def read_state(folder: Path) -> dict:
    """alignkit_state.json of a verified checkpoint."""
    return json.loads((folder / STATE_FILE).read_text())


def checkpoints(root: Path) -> list[Path]:
    """Checkpoints whose manifest was written, oldest first (a temporary or half-written folder never counts)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def save(accelerator: Accelerator, root: Path, step: int, state: dict, limit: int | None, scheduler,
         files: dict[str, str] | None = None, folder=None, process_files: dict[str, bytes] | None = None) -> Path:
    """Write the accelerate state, the scheduler, `state` and `files` (name -> text) to a temporary folder,
    then the manifest, then rename it into place. `process_files` (name -> bytes) are written by each process
    (their names differ by process). `folder` (alignkit.engine.ownership.RunFolder) records each checkpoint
    in the run's manifest before it is written; only checkpoints it records are replaced or rotated away."""
    final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
    owns = folder.owns if folder is not None else (lambda path: True)
    if accelerator.is_main_process:
        if final.exists() and not owns(final) or tmp.exists() and not owns(tmp):
            raise ConfigError(f"train.checkpoint_dir: {final} is not this run's (alignkit did not record it); "
                              "nothing was replaced: move it away and resume with train.resume_from_checkpoint=auto")
        if folder is not None:
            folder.record(tmp, "tree")
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with tied_weights_expected(accelerator._models):
        accelerator.save_state(str(tmp))
    for name, data in (process_files or {}).items():
        (tmp / name).write_bytes(data)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)  # plain data: loads with weights_only=True
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
        if folder is not None:
            folder.record(final, "tree")
        if final.exists():  # the same step saved again (a stop right after a scheduled save)
            old = root / f".old-checkpoint-{step}"
            if folder is not None:
                folder.record(old, "tree")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
            if folder is not None:
                folder.forget(old)
        else:
            tmp.rename(final)
        if folder is not None:
            folder.forget(tmp)
        if limit:
            for old in [p for p in checkpoints(root) if owns(p)][:-limit]:
                shutil.rmtree(old)
                if folder is not None:
                    folder.forget(old)
    accelerator.wait_for_everyone()
    return final


def find(spec: str, root: Path) -> Path | None:
    """The checkpoint `train.resume_from_checkpoint` names, verified: a folder, or `auto` (the newest intact
    one, warning about newer damaged ones; None if there is no checkpoint at all)."""
    if spec != "auto":
        path = Path(spec)
        problem = verify(path) if path.is_dir() else "no such folder"
        if problem:
            raise ConfigError(f"train.resume_from_checkpoint: {spec} cannot be resumed: {problem}")
        return path
    found = checkpoints(root)
    damaged = []
    for path in reversed(found):
        problem = verify(path)
        if problem is None:
            if damaged:
                log.warning("train.resume_from_checkpoint=auto: skipped damaged %s; resuming from %s",
                            "; ".join(damaged), path.name)
            return path
        damaged.append(f"{path.name} ({problem})")
    if damaged:
        raise ConfigError(f"train.resume_from_checkpoint=auto: no intact checkpoint in {root}: {'; '.join(damaged)}; "
                          "start over with train.overwrite_output_dir=true")
    return None


def load(accelerator: Accelerator, path: Path, scheduler) -> dict:
    """Restore model, optimizer, RNG (accelerate, weights_only) and the scheduler; return the saved state."""
    try:
        accelerator.load_state(str(path))
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
        return json.loads((path / STATE_FILE).read_text())
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.resume_from_checkpoint: {path} cannot be loaded: "
                          f"{type(e).__name__}: {first}") from None


_SHARED = re.compile(r"Removed shared tensor (\{.*?\}) while saving")


@contextlib.contextmanager
def tied_weights_expected(models):
    """Silence accelerate's `Removed shared tensor {...} while saving` while saving `models`, for exactly the tensors
    that are the models' own tied weights (e.g. lm_head.weight tied to the embedding: safetensors keeps one copy and
    loading re-ties it). A warning naming any other tensor still passes."""
    from accelerate.utils import id_tensor_storage

    tied = set()
    for model in models:
        groups: dict = {}
        for name, tensor in model.state_dict().items():
            if isinstance(tensor, torch.Tensor):
                groups.setdefault(id_tensor_storage(tensor), []).append(name)
        tied.update(n for names in groups.values() if len(names) > 1 for n in names)

    def expected(record: logging.LogRecord) -> bool:
        found = _SHARED.search(record.getMessage())
        if not found:
            return True
        try:
            names = ast.literal_eval(found.group(1))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(names, set) and names <= tied)

    logger = logging.getLogger("accelerate.utils.other")
    logger.addFilter(expected)
    try:
        yield
    finally:
        logger.removeFilter(expected)
