"""Built-in rewards: exact match against the row's `answer`, partial credit for the sorting demo, a format check.

Each takes the prompts and completions as text and the prompt rows' columns; `answer` is the ground truth.
"""

import re

_DIGITS = re.compile(r"^ ?\d( \d)*$")


def exact_match(prompts, completions, answer, **columns) -> list[float | None]:
    """1.0 when the completion equals the row's `answer` (surrounding spaces ignored), else 0.0; None without one."""
    return [None if a is None else float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def sort_order(prompts, completions, answer, **columns) -> list[float | None]:
    """Share of positions holding the right item of `answer` (space-separated), over the longer of the two."""
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        if a is None:
            out.append(None)
            continue
        got, want = c.split(), str(a).split()
        out.append(sum(x == y for x, y in zip(got, want)) / max(len(got), len(want), 1))
    return out


def digits_format(prompts, completions, **columns) -> list[float]:
    """1.0 for a completion that is digits separated by single spaces (the demo's answer format), else 0.0."""
    return [float(bool(_DIGITS.match(c.rstrip()))) for c in completions]


BUILTIN = {"exact-match": exact_match, "sort-order": sort_order, "digits-format": digits_format}
