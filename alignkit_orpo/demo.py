"""ORPO's built-in demo data: preference pairs for sorting digits (`builtin:sort`, `builtin:sort-chat`).

The chosen answer is the sorted list, the rejected one the same digits in a wrong order, so a model
that learns the task ranks every held-out pair correctly. The lists come from alignkit.blocks.demo.
"""

import random

import datasets

from alignkit.blocks.demo import N_TEST, N_TRAIN, digit_lists, prompt, words, wrong_order


def sort_pairs(n: int, seed: int, offset: int = 0) -> list[dict[str, str]]:
    """`n` standard explicit-prompt pairs; `offset` skips that many lists of the same stream."""
    rng = random.Random(seed + 1)
    rows = []
    for digits in digit_lists(offset + n, seed)[offset:]:
        rows.append({"prompt": prompt(digits), "chosen": f" {words(sorted(digits))}",
                     "rejected": f" {words(wrong_order(digits, rng))}"})
    return rows


def _to_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    return {
        "prompt": [{"role": "user", "content": row["prompt"].removesuffix(" =")}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def load(name: str, split: str) -> datasets.Dataset:
    """`sort` (standard) or `sort-chat` (conversational), split `train` or `test`."""
    rows = sort_pairs(N_TRAIN, seed=0) if split == "train" else sort_pairs(N_TEST, seed=0, offset=N_TRAIN)
    if name == "sort-chat":
        rows = [_to_chat(r) for r in rows]
    return datasets.Dataset.from_list(rows)


def register(register_dataset) -> None:
    for name in ("sort", "sort-chat"):
        register_dataset(name, lambda split, name=name: load(name, split))

