"""The common rewards the core ships for every online method (registered under these names by the core):

| name | reads | reward |
|---|---|---|
| `exact-match` | `answer` column | 1.0 when the completion equals the row's `answer` (outer spaces ignored), else 0 |
| `regex-match` | `pattern` column | 1.0 when the whole completion matches the row's regular expression, else 0.0 |
| `length-penalty` | `max_chars` column | -0.01 per character beyond the row's `max_chars` |

A row whose column is null gets None (the reward does not apply to it). `regex_reward(pattern)` and
`length_penalty_reward(max_chars)` make the same rewards with a fixed setting, for a plugin to register under a name
of its own, e.g. `register("think-format", regex_reward(r"<think>.*</think>.*"))`.
"""

import re
from collections.abc import Callable

from alignkit.errors import ConfigError, DataError


def exact_match(prompts, completions, answer, **columns) -> list[float | None]:
    """1.0 when the completion equals the row's `answer` (surrounding spaces ignored), else 0.0; None without one."""
    return [None if a is None else float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def _compile(pattern: str, where: str, error: type[Exception] = DataError) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except (re.error, TypeError) as e:
        raise error(f"{where}: {pattern!r} is not a regular expression ({e})") from None


def regex_match(prompts, completions, pattern, **columns) -> list[float | None]:
    """1.0 when the whole completion (trailing whitespace ignored) matches the row's `pattern` (a Python regular
    expression, `.` matching newlines too), else 0.0; None where the row has no pattern."""
    cache: dict[str, re.Pattern] = {}
    out: list[float | None] = []
    for i, (c, p) in enumerate(zip(completions, pattern)):
        if p is None:
            out.append(None)
            continue
        if p not in cache:
            cache[p] = _compile(p, f"reward 'regex-match', row {i}, column 'pattern'")
        out.append(float(cache[p].fullmatch(c.rstrip()) is not None))
    return out


def regex_reward(pattern: str) -> Callable[..., list[float]]:
    """A reward that is 1.0 when the whole completion matches `pattern` (checked now: a ConfigError if invalid)."""
    compiled = _compile(pattern, "regex_reward", ConfigError)

    def reward(prompts, completions, **columns) -> list[float]:
        return [float(compiled.fullmatch(c.rstrip()) is not None) for c in completions]

    return reward


def length_penalty(prompts, completions, max_chars, **columns) -> list[float | None]:
    """-0.01 per character beyond the row's `max_chars` column; None where a row has no limit. Data without the
    column is refused (the reward could never score): `length_penalty_reward(max_chars)` sets one limit for all."""
    return [None if m is None else -0.01 * max(0, len(c) - int(m)) for c, m in zip(completions, max_chars)]


def length_penalty_reward(max_chars: int, per_char: float = 0.01) -> Callable[..., list[float]]:
    """A reward of -`per_char` per character beyond `max_chars`, for every completion."""
    if not isinstance(max_chars, int) or max_chars < 0:
        raise ConfigError(f"length_penalty_reward: max_chars must be an integer >= 0, not {max_chars!r}")

    def reward(prompts, completions, **columns) -> list[float]:
        return [-per_char * max(0, len(c) - max_chars) for c in completions]

    return reward


COMMON = {"exact-match": exact_match, "regex-match": regex_match, "length-penalty": length_penalty}
