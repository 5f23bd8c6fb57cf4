"""A neutral generator for plugins' built-in demo data: lists of digits to sort.

Every shipped method's demo teaches the tiny built-in model the same task (sort a few digits), in the
data shape that method trains on; a plugin builds its rows from these lists and registers them with the
`register_datasets` hook. Train and test lists never overlap.
"""

import random

#: lists in the train split and the test split (the test lists follow the train lists in one stream)
N_TRAIN, N_TEST = 2000, 200


def digit_lists(n: int, seed: int = 0) -> list[list[int]]:
    """The first `n` lists of a reproducible stream: 3 to 6 digits, not all equal, no list twice."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < n:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 6)))
        if digits not in seen and len(set(digits)) > 1:
            seen.add(digits)
            out.append(list(digits))
    return out


def split_lists(split: str, seed: int = 0) -> list[list[int]]:
    """The lists of `split`: "train" (the first N_TRAIN of the stream) or "test" (the next N_TEST)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lists = digit_lists(N_TRAIN + (N_TEST if split == "test" else 0), seed)
    return lists[:N_TRAIN] if split == "train" else lists[N_TRAIN:]


def wrong_order(digits: list[int], rng: random.Random) -> list[int]:
    """The same digits in an order other than sorted (a wrong answer)."""
    target = sorted(digits)
    while True:
        candidate = digits[:]
        rng.shuffle(candidate)
        if candidate != target:
            return candidate


def words(digits: list[int]) -> str:
    """Digits as text: [3, 1, 2] -> "3 1 2"."""
    return " ".join(map(str, digits))


def prompt(digits: list[int]) -> str:
    """The task as plain text: "sort: 3 1 2 =" (the answer follows as " 1 2 3")."""
    return f"sort: {words(digits)} ="


def question(digits: list[int]) -> str:
    """The task as a chat user message: "sort: 3 1 2"."""
    return f"sort: {words(digits)}"
