"""alignkit: LLM post-training with methods as plugins, on one accelerate engine."""

from alignkit import formatters, text, tokens  # public building blocks, as modules
from alignkit.api import RunResult, evaluate, get_method, load_config, methods, run
from alignkit.context import StepContext
from alignkit.data import pad_right
from alignkit.errors import AlignkitError, ConfigError, DataError, PluginError
from alignkit.formatter import DataFormatter, DropExample, Formatted
from alignkit.hookspecs import hookimpl
from alignkit.logps import RowLogps, SequenceScorer
from alignkit.loss import Loss, LossOutput, log1mexp, shifted_token_logps
from alignkit.method import Method, MethodConfig
from alignkit.plugins import get_plugin_manager

__version__ = "0.1.0"

__all__ = [
    "AlignkitError", "ConfigError", "DataError", "DataFormatter", "DropExample", "Formatted", "Loss",
    "LossOutput", "Method", "MethodConfig", "PluginError", "RowLogps", "RunResult", "SequenceScorer", "StepContext",
    "evaluate", "formatters", "get_method", "get_plugin_manager", "hookimpl", "load_config", "log1mexp", "methods",
    "pad_right", "run", "shifted_token_logps", "text", "tokens",
]
