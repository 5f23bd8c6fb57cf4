"""The Python API: methods by name, configs as in the CLI, runs that return their results."""

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignkit.config import BUILTIN_MODEL, RunConfig, load_yaml, resolve, user_layer
from alignkit.engine.ownership import files_in
from alignkit.errors import ConfigError
from alignkit.plugin.method import Method
from alignkit.plugins import PluginManager, build_registry, get_plugin_manager

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a training run returns: where it wrote, its last logged and eval metrics, its step."""

    output_dir: Path
    metrics: dict[str, float]
    global_step: int
    config: RunConfig


def methods(plugins: PluginManager | None = None) -> list[Method]:
    """Every registered method, sorted by name."""
    registry = build_registry(plugins or get_plugin_manager())
    return [registry.methods[name] for name in sorted(registry.methods)]


def get_method(name: str, plugins: PluginManager | None = None) -> Method:
    """The method registered as `name`; PluginError lists the registered ones otherwise."""
    return build_registry(plugins or get_plugin_manager()).get(name)


def load_config(method: str | None = None, config: str | Path | Mapping | None = None,
                overrides: Mapping[str, Any] | list[str] | None = None,
                plugins: PluginManager | None = None) -> tuple[RunConfig, Method]:
    """Validate a config (YAML path or dict) plus overrides for `method` (or the config's method.name)."""
    user = user_layer(config, overrides)
    in_config = OmegaConf.select(user, "method.name", default=None)
    if method and in_config and method != in_config:
        raise ConfigError(f"--method {method} disagrees with method.name: {in_config} in the config")
    name = method or in_config
    registry = build_registry(plugins or get_plugin_manager())
    if not name:
        raise ConfigError(f"no method given: pass --method NAME or set method.name; registered: "
                          f"{', '.join(sorted(registry.methods)) or 'none'}")
    chosen = registry.get(name)
    OmegaConf.update(user, "method.name", name, force_add=True)
    return resolve(chosen, user), chosen


def run(method: str | None = None, config: str | Path | Mapping | None = None, *,
        plugins: PluginManager | None = None, model=None, tokenizer=None, train_dataset=None,
        eval_dataset=None, schedule=None, optimizer=None, lr_scheduler=None, **overrides: Any) -> RunResult:
    """Train `method`. Overrides use the CLI's dotted keys: run("NAME", **{"train.max_steps": 10}).

    `schedule` (an alignkit.engine.schedule.Schedule), `optimizer(model)` and `lr_scheduler(optimizer,
    num_training_steps)` replace the ones the config describes."""
    from alignkit.engine.loop import Engine

    pm = plugins or get_plugin_manager()
    cfg, chosen = load_config(method, config, overrides, pm)
    engine = Engine(cfg, chosen, pm, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                    eval_dataset=eval_dataset, schedule=schedule, optimizer=optimizer, lr_scheduler=lr_scheduler,
                    config_file=str(config) if isinstance(config, (str, Path)) else None)
    metrics = engine.train()
    return RunResult(Path(cfg.train.output_dir), metrics, engine.state.step, cfg)


def evaluate(method: str | None = None, config: str | Path | Mapping | None = None, *,
             plugins: PluginManager | None = None, model=None, tokenizer=None, eval_dataset=None,
             **overrides: Any) -> dict[str, float]:
    """Evaluate model.name_or_path on data.eval (or data.train), in order; also writes eval_results.json into
    train.output_dir (by default: the evaluated model's folder, or outputs/NAME-eval), never into another run."""
    from alignkit.engine.loop import Engine

    pm = plugins or get_plugin_manager()
    method = method or (None if model is not None else _method_of_model_folder(config, overrides))
    cfg, chosen = load_config(method, config, overrides, pm)
    trained = None if model is not None else trained_settings(cfg, config, overrides)
    if trained:  # the settings the model was trained (and evaluated) with, below the user's own
        cfg, chosen = load_config(method, OmegaConf.merge(trained, user_layer(config, overrides)), None, pm)
    if model is None and cfg.model.name_or_path == BUILTIN_MODEL:
        log.warning("alignkit eval: evaluating the untrained built-in model %s (random weights from train.seed); to "
                    "evaluate a trained one give model.name_or_path=FOLDER, e.g. model.name_or_path=outputs/%s",
                    BUILTIN_MODEL, chosen.name)
    cfg.train.output_dir = str(_eval_dir(cfg, chosen, model is not None))
    out = Path(cfg.train.output_dir)
    record = files_in(out, ["eval_results.json"], key="train.output_dir")  # refused before any work
    engine = Engine(cfg, chosen, pm, model=model, tokenizer=tokenizer, eval_dataset=eval_dataset, check_folder=False)
    metrics = engine.evaluate()
    if engine.accelerator.is_main_process:
        record(out / "eval_results.json")
        tmp = out / ".eval_results.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, out / "eval_results.json")
    return metrics


#: the settings of a trained model's run that decide its eval numbers: `alignkit eval FOLDER` takes them from the
#: folder's config.yaml unless given (the data, the method's settings, the eval batch size, precision, seed)
EVAL_SETTINGS = ("data", "method", "train.per_device_eval_batch_size", "train.seed", "train.bf16", "train.fp16",
                 "model.dtype", "model.attn_implementation")


def _method_of_model_folder(config, overrides) -> str | None:
    """The method a trained model.name_or_path folder was trained with (its config.yaml), when none is given."""
    user = user_layer(config, overrides)
    folder = OmegaConf.select(user, "model.name_or_path", default=None)
    saved = Path(folder) / "config.yaml" if folder else None
    if OmegaConf.select(user, "method.name", default=None) or saved is None or not saved.is_file():
        return None
    try:
        return OmegaConf.select(load_yaml(saved), "method.name", default=None)
    except ConfigError:
        return None


def trained_settings(cfg: RunConfig, config, overrides) -> DictConfig | None:
    """The eval-deciding settings of the run whose output folder is model.name_or_path (its config.yaml), for the
    same method; None when the model is no such folder."""
    saved = Path(cfg.model.name_or_path) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        run = load_yaml(saved)
    except ConfigError as e:
        log.warning("alignkit eval: not using %s for the eval settings: %s", saved, e)
        return None
    if OmegaConf.select(run, "method.name", default=None) != cfg.method.name:
        return None
    out = OmegaConf.create({})
    for key in EVAL_SETTINGS:
        value = OmegaConf.select(run, key, default=None, throw_on_missing=False)
        if value is not None:
            OmegaConf.update(out, key, value, force_add=True)
    user = user_layer(config, overrides)  # one held-out source: the user's choice replaces the run's other one
    for given, other in (("data.eval", "data.eval_fraction"), ("data.eval_fraction", "data.eval")):
        if OmegaConf.select(user, given, default=None) is not None and OmegaConf.select(out, other, default=None):
            OmegaConf.update(out, other, None)
    return out


def _eval_dir(cfg: RunConfig, method: Method, model_given: bool) -> Path:
    """Where eval_results.json goes: train.output_dir if set, else beside the evaluated local model, else
    outputs/NAME-eval. A folder holding another training run is refused."""
    out, model_dir = Path(cfg.train.output_dir), Path(cfg.model.name_or_path)
    own = not model_given and model_dir.is_dir()
    if cfg.train.output_dir == f"outputs/{method.name}":  # the default: the default training run's folder
        out = model_dir if own else Path(f"outputs/{method.name}-eval")
    beside_model = own and out.resolve() == model_dir.resolve()
    if not beside_model and any((out / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints")):
        raise ConfigError(f"train.output_dir: {out} holds a training run; evaluation writes eval_results.json only "
                          "beside the evaluated model or into a folder of its own: set train.output_dir")
    return out
