"""KTO's built-in demo data `builtin:sort-kto`: unpaired examples for sorting digits.

Each list of digits (alignkit.blocks.demo) gives two examples: the sorted answer (desirable, label true) and the
same digits in a wrong order (undesirable, label false). The examples are shuffled with a fixed seed, so
that neighbours (the KL pairs) almost always have different prompts. Train and test lists never overlap.
"""

import random

import datasets

from alignkit.blocks.demo import prompt, split_lists, words, wrong_order

NAME = "sort-kto"


def sort_kto_rows(split: str, seed: int = 0) -> list[dict]:
    """The rows of `split` ("train" or "test"): prompt, completion, label."""
    rng = random.Random(seed + 1)
    rows = []
    for digits in split_lists(split, seed):
        rows.append({"prompt": prompt(digits), "completion": f" {words(sorted(digits))}", "label": True})
        rows.append({"prompt": prompt(digits), "completion": f" {words(wrong_order(digits, rng))}", "label": False})
    random.Random(seed + 2).shuffle(rows)
    return rows


def load(split: str) -> datasets.Dataset:
    return datasets.Dataset.from_list(sort_kto_rows(split))
