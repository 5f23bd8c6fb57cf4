"""What a resumed run checks: the config it resumes with against the one the checkpoint was made with,
and what a crash may have left in metrics.jsonl.

Keys that only change what is logged, saved or shown may change on resume; the change is recorded in
config.yaml (a comment line per resume) and the model card. Any other difference is refused, naming
the keys: the optimizer, scheduler and data position in the checkpoint belong to the old values.
"""

import json
import logging
from pathlib import Path

import yaml

from alignkit.config import RunConfig, to_yaml
from alignkit.errors import ConfigError

log = logging.getLogger(__name__)

#: keys a resumed run may change: they do not touch the optimisation or the order of the training data
CHANGEABLE = frozenset({
    "train.output_dir", "train.overwrite_output_dir", "train.resume_from_checkpoint", "train.save_steps",
    "train.save_total_limit", "train.logging_steps", "train.logging_first_step", "train.eval_steps",
    "train.eval_on_start", "train.report_to", "train.run_name", "train.disable_tqdm", "train.plots",
    "train.dataloader_num_workers", "train.per_device_eval_batch_size", "train.skip_nonfinite_steps",
    "train.gradient_checkpointing", "data.eval", "data.eval_split", "data.max_eval_samples",
})
#: the comment lines config.yaml carries for each resume with changed settings
NOTE_PREFIX = "# resumed "


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in (tree or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differences(saved_yaml: str, config: RunConfig) -> dict[str, tuple]:
    """key -> (saved, now) for every key whose value differs (keys only one side knows are ignored)."""
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


def notes(config_yaml: Path) -> list[str]:
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
                raise ConfigError(f"{path}:{i + 1}: not valid JSON ({e.msg}); fix or remove the line to resume") from None
            log.warning("%s: dropping the half-written last line %d", path, i + 1)
            path.write_text("".join(ln + "\n" for ln in lines[:i]))
