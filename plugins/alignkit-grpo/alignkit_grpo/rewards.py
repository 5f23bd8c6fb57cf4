"""GRPO's demo rewards: partial credit for the sorting demo and its answer format. `exact-match` is the core's
(alignkit.online.common_rewards), registered by the core for every online method; `BUILTIN` keeps all three by name.

Each takes the prompts and completions as text and the prompt rows' columns; `answer` is the ground truth.
"""

import re

from alignkit.online.common_rewards import exact_match

_DIGITS = re.compile(r"^ ?\d( \d)*$")


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


#: the rewards GRPO registers (the sorting demo's)
DEMO = {"sort-order": sort_order, "digits-format": digits_format}
#: every reward the GRPO demo uses, by name (exact-match from the core)
BUILTIN = {"exact-match": exact_match, **DEMO}
