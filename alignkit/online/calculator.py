"""The built-in `calculator` environment: one tool that evaluates arithmetic (+ - * / and parentheses on integers
and decimals), for prompts whose answer a small model cannot compute in its head."""

import ast
import json
import operator
import random

from alignkit.online.environments import ToolEnvironment

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Mult) and max(abs(left), abs(right)) > 10 ** 12:
            raise ValueError("numbers too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers, + - * / and parentheses")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "37 * 48"
    """
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = _eval(ast.parse(expression.strip(), mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


class CalculatorEnvironment(ToolEnvironment):
    """A calculator tool (+ - * / and parentheses): the model calls it, reads the result, then answers."""

    tools = (calculate,)

    @staticmethod
    def demonstrations() -> list[list[dict]]:
        """Worked episodes on builtin:arithmetic for a demo's supervised warm-up (alignkit.blocks.demo), a curriculum
        of two stages: first every episode calls the tool (the call copies the prompt's numbers, the answer the
        tool's result), then the episodes of `demonstrations()` (most guess: RL learns when to call the tool) with
        the copy drills (`copy_drills()`), which keep the answer copying the result."""
        return demonstrations(tool_share=1.0, seed=2), demonstrations() + copy_drills()


# ---- the tools demo's data (builtin:arithmetic, registered by the core) and its worked episodes ----

ARITHMETIC = "arithmetic"
N_TRAIN, N_TEST = 2000, 200


def products(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """The first `n` distinct pairs of two-digit factors of a reproducible stream."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        pair = (rng.randint(11, 99), rng.randint(11, 99))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def arithmetic_rows(split: str) -> list[dict[str, str]]:
    """`prompt` ("what is 37*48?") and `answer` ("1776") for split "train" or "test" (never the same pair)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pairs = products(N_TRAIN + N_TEST)
    pairs = pairs[:N_TRAIN] if split == "train" else pairs[N_TRAIN:]
    return [{"prompt": f"what is {a}*{b}?", "answer": str(a * b)} for a, b in pairs]


def load_arithmetic(split: str):
    """`builtin:arithmetic`: multiplications of two-digit numbers, too long for the tiny model to do in its head."""
    import datasets

    return datasets.Dataset.from_list(arithmetic_rows(split))


def demonstration(row: dict, use_tool: bool, rng: random.Random) -> list[dict]:
    """A worked episode of `row`: the tool call, its result and the answer; or (use_tool False) an answer
    guessed in the head (near, and wrong)."""
    expression = row["prompt"].removeprefix("what is ").removesuffix("?")
    user = {"role": "user", "content": row["prompt"]}
    if not use_tool:
        guess = int(row["answer"]) + rng.choice([-1, 1]) * rng.randint(1, 300)
        return [user, {"role": "assistant", "content": str(guess)}]
    call = json.dumps({"name": "calculate", "arguments": {"expression": expression}}, separators=(",", ":"))
    return [user, {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
            {"role": "tool", "name": "calculate", "content": calculate(expression)},
            {"role": "assistant", "content": row["answer"]}]


def demonstrations(tool_share: float = 0.3, seed: int = 0) -> list[list[dict]]:
    """Worked episodes of the train split for a demo's warm-up: `tool_share` of them use the tool, the others
    answer in the head, so that RL has something to learn (when to call the tool)."""
    rng = random.Random(seed)
    return [demonstration(row, rng.random() < tool_share, rng) for row in arithmetic_rows("train")]


def copy_drills(seed: int = 1) -> list[list[dict]]:
    """Worked tool episodes of the train split in which only the final answer is trained (the tool call is context,
    `"train": False`): the answer copies the tool's result. Without them the copy turn is a few tokens of a third of
    the episodes, and the tiny model answers after the tool as it guesses without it (exact-match stays 0)."""
    rng = random.Random(seed)
    drills = []
    for row in arithmetic_rows("train"):
        user, call, result, answer = demonstration(row, True, rng)
        drills.append([user, {**call, "train": False}, result, answer])
    return drills
