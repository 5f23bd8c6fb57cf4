"""alignkit: LLM post-training with methods as plugins, on one accelerate engine.

The public API is what this module exports (`__all__`) plus the public wings: `alignkit.plugin` (what a plugin
implements), `alignkit.blocks` (what it computes with), `alignkit.formatters` (data shapes) and `alignkit.online`
(generation, rewards, rollouts). `alignkit.engine` and `alignkit.cli` are private. docs/api.md lists every name.
"""

from alignkit import blocks, formatters, online, plugin  # the public wings, as modules
from alignkit.api import RunResult, evaluate, get_method, load_config, methods, run
from alignkit.blocks import text, tokens
from alignkit.blocks.logps import RowLogps, SequenceScorer
from alignkit.blocks.tokens import pad_right
from alignkit.engine.data import cache_dir
from alignkit.engine.data import prepare as prepare_dataset
from alignkit.engine.loop import Engine
from alignkit.engine.modelcard import model_card
from alignkit.engine.modeling import apply_peft, load_model, load_tokenizer
from alignkit.engine.optim import build_optimizer
from alignkit.engine.optim import schedule as build_lr_scheduler
from alignkit.engine.schedule import Actions, Schedule
from alignkit.errors import AlignkitError, ConfigError, DataError, PluginError
from alignkit.plugin.context import StepContext
from alignkit.plugin.formatter import DataFormatter, DropExample, Formatted
from alignkit.plugin.hookspecs import hookimpl, registers
from alignkit.plugin.loss import Loss, LossOutput, log1mexp, shifted_token_logps
from alignkit.plugin.method import Method, MethodConfig
from alignkit.plugins import get_plugin_manager

__version__ = "0.1.0"

__all__ = [
    # running methods (docs/api.md "Running")
    "RunResult", "evaluate", "get_method", "get_plugin_manager", "load_config", "methods", "run",
    # errors
    "AlignkitError", "ConfigError", "DataError", "PluginError",
    # writing a method (also under alignkit.plugin)
    "DataFormatter", "DropExample", "Formatted", "Loss", "LossOutput", "Method", "MethodConfig", "StepContext",
    "hookimpl", "registers",
    # building blocks (also under alignkit.blocks)
    "RowLogps", "SequenceScorer", "log1mexp", "pad_right", "shifted_token_logps",
    # the wings and block modules
    "blocks", "formatters", "online", "plugin", "text", "tokens",
    # for front ends that drive the engine themselves (a TRL-style trainer)
    "Actions", "Engine", "Schedule", "apply_peft", "build_lr_scheduler", "build_optimizer", "cache_dir",
    "load_model", "load_tokenizer", "model_card", "prepare_dataset",
]
