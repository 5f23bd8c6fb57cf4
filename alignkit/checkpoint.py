"""Checkpoints (checkpoint-N folders under output_dir/train.checkpoint_dir): written atomically, found for
`auto`, rotated. The engine's own state is alignkit_state.json: trainer_state.json is left to tools that
write transformers' TrainerState (the TRL-compatible trainer does)."""

import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from alignkit.errors import ConfigError

STATE_FILE = "alignkit_state.json"
SCHEDULER_FILE = "scheduler.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary or half-written folder never counts)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save(accelerator: Accelerator, root: Path, step: int, state: dict, limit: int | None, scheduler) -> Path:
    """Write the accelerate state, the scheduler and `state` to a temporary folder, then rename it into place."""
    final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)  # plain data: loads with weights_only=True
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if limit:
            for old in checkpoints(root)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_all(root: Path, remove_root: bool) -> None:
    """Remove every checkpoint-N folder (complete or not) under root, and nothing else; then root itself if
    asked and empty (not when root is output_dir, train.checkpoint_dir=".")."""
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and _NAME.match(path.name.removeprefix(".tmp-")):
            shutil.rmtree(path)
    if remove_root and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def find(spec: str, root: Path) -> Path | None:
    """The checkpoint `train.resume_from_checkpoint` names: a folder, or `auto` (latest; None if none)."""
    if spec == "auto":
        found = checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from_checkpoint: {spec} is not a complete alignkit checkpoint (no {STATE_FILE})")
    return path


def load(accelerator: Accelerator, path: Path, scheduler) -> dict:
    """Restore model, optimizer, RNG (accelerate, weights_only) and the scheduler; return the saved state."""
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
