"""Errors a user can cause and fix. The CLI prints them on one line and exits with code 2."""

import difflib
from collections.abc import Iterable


class AlignkitError(ValueError):
    """A mistake in the user's config, data, model or choice of plugin."""


class ConfigError(AlignkitError):
    """A config key or value is wrong."""


class DataError(AlignkitError):
    """A dataset is missing, empty or malformed."""


class PluginError(AlignkitError):
    """A method is unknown, registered twice, or its plugin failed to load."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:  # a name in the wrong case (MYMETHOD for mymethod): compare without case
        folded = {c.lower(): c for c in reversed(choices)}
        close = [folded[c] for c in difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.6)]
    return f" (did you mean '{close[0]}'?)" if close else ""


class NonFiniteError(AlignkitError):
    """A training step produced a NaN or infinite loss or gradient."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; `signum` is the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
