"""The built-in preference dataset: sort a list of digits.

The chosen answer is the sorted list, the rejected one the same digits in a wrong order, so a
model that learns the task ranks every held-out pair correctly. Train and test prompts never overlap.
"""

import random

import datasets

N_TRAIN, N_TEST = 2000, 200
SPLITS = ("train", "test")


def _unique_lists(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < n:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 6)))
        if digits not in seen and len(set(digits)) > 1:
            seen.add(digits)
            out.append(list(digits))
    return out


def _wrong_order(digits: list[int], rng: random.Random) -> list[int]:
    target = sorted(digits)
    while True:
        candidate = digits[:]
        rng.shuffle(candidate)
        if candidate != target:
            return candidate


def _words(digits: list[int]) -> str:
    return " ".join(map(str, digits))


def sort_pairs(n: int, seed: int, offset: int = 0) -> list[dict[str, str]]:
    """`n` standard explicit-prompt pairs; `offset` skips that many lists of the same stream."""
    rng = random.Random(seed + 1)
    rows = []
    for digits in _unique_lists(offset + n, seed)[offset:]:
        rows.append({
            "prompt": f"sort: {_words(digits)} =",
            "chosen": f" {_words(sorted(digits))}",
            "rejected": f" {_words(_wrong_order(digits, rng))}",
        })
    return rows


def _to_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    question = row["prompt"].removesuffix(" =")
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def load(name: str, split: str) -> datasets.Dataset:
    """`builtin:sort` (standard) or `builtin:sort-chat` (conversational), split `train` or `test`."""
    rows = sort_pairs(N_TRAIN, seed=0) if split == "train" else sort_pairs(N_TEST, seed=0, offset=N_TRAIN)
    if name == "sort-chat":
        rows = [_to_chat(r) for r in rows]
    return datasets.Dataset.from_list(rows)


NAMES = ("sort", "sort-chat")
