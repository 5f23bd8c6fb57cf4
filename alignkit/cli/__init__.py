"""The command line: a thin shell over alignkit.api (`alignkit ...`, `python -m alignkit ...`)."""

from alignkit.cli.commands import main

__all__ = ["main"]
