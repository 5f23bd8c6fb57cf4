"""What a plugin implements: the method, its loss and formatter interfaces, the step context, the hooks."""

from alignkit.plugin.context import StepContext
from alignkit.plugin.formatter import DataFormatter, DropExample, Formatted
from alignkit.plugin.hookspecs import hookimpl
from alignkit.plugin.loss import Loss, LossOutput
from alignkit.plugin.method import Method, MethodConfig

__all__ = ["DataFormatter", "DropExample", "Formatted", "Loss", "LossOutput", "Method", "MethodConfig", "StepContext",
           "hookimpl"]
