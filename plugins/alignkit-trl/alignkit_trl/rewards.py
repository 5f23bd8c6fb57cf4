"""The reward functions TRL 1.16's `trl.rewards` offers (what its GRPO and RLOO scripts import), as functions
GRPOTrainer / RLOOTrainer take: think_format_reward, get_soft_overlong_punishment, accuracy_reward and
reasoning_accuracy_reward (the last two verify maths answers with the math-verify package, as TRL's do)."""

import re

_THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def _text(completion) -> str:
    """A completion's text: a string, or a conversation's first message content."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def think_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion is `<think>...</think>` (one think block) followed by the answer, else 0.0."""
    return [1.0 if _THINK.match(_text(c)) else 0.0 for c in completions]


class _SoftOverlong:
    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int) -> None:
        self.max_len, self.cache = max_completion_len, soft_punish_cache

    def __call__(self, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("soft_overlong_punishment_reward counts completion tokens (completion_ids), which "
                             "alignkit's rollout does not pass to reward functions; use a reward on the text")
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= self.max_len - self.cache:
                out.append(0.0)
            elif n <= self.max_len:
                out.append((self.max_len - self.cache - n) / self.cache)
            else:
                out.append(-1.0)
        return out


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int):
    """DAPO's soft overlong punishment: 0 up to max - cache tokens, then falling linearly to -1 at max, -1 beyond."""
    return _SoftOverlong(max_completion_len, soft_punish_cache)


def _verify(completions, solution, strip_think: bool) -> list[float | None]:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("accuracy_reward needs the math-verify package: pip install math-verify") from None
    out = []
    for completion, answer in zip(completions, solution):
        text = _text(completion)
        if strip_think:
            if "</think>" not in text:
                out.append(0.0)
                continue
            text = text.split("</think>", 1)[1]
        gold = parse(answer)
        if not gold:
            out.append(None)  # a solution math-verify cannot read: no reward for this row
            continue
        out.append(float(verify(gold, parse(text))))
    return out


def accuracy_reward(completions, solution, **kwargs) -> list[float | None]:
    """1.0 when the completion's answer equals the row's `solution` mathematically (math-verify), else 0.0."""
    return _verify(completions, solution, strip_think=False)


def reasoning_accuracy_reward(completions, solution, **kwargs) -> list[float | None]:
    """accuracy_reward on what follows the `</think>` of the completion (0.0 without one)."""
    return _verify(completions, solution, strip_think=True)
