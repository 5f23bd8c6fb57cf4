"""A neutral generator for plugins' built-in demo data: lists of digits to sort.

Every shipped method's demo teaches the tiny built-in model the same task (sort a few digits), in the
data shape that method trains on; a plugin builds its rows from these lists and registers them with the
`register_datasets` hook. Train and test lists never overlap.
"""

import random

#: lists in the train split and the test split (the test lists follow the train lists in one stream)
N_TRAIN, N_TEST = 2000, 200

#: the training settings every demo shares (tiny built-in model on built-in data: a run of seconds that logs,
#: evaluates from step 0 and keeps two checkpoints)
DEMO_TRAIN = {
    "train.per_device_train_batch_size": 16, "train.per_device_eval_batch_size": 50, "train.warmup_ratio": 0.05,
    "train.logging_steps": 10, "train.eval_steps": 50, "train.save_steps": 100, "train.save_total_limit": 2,
    "train.eval_on_start": True,
}


def demo_defaults(learning_rate: float = 3e-3, num_train_epochs: int | None = 1, **settings) -> dict:
    """A method's `Method.demo_defaults`: DEMO_TRAIN with its learning rate and epochs (None: no epochs key, e.g.
    for `train.max_steps`), then `settings`, dotted keys (`**{"method.beta": 0.5}`) that add or replace."""
    wrong = [key for key in settings if "." not in key]
    if wrong:
        raise ValueError(f"demo_defaults: {', '.join(wrong)} is not a dotted key (e.g. 'train.eval_steps')")
    out = {**DEMO_TRAIN, "train.learning_rate": learning_rate, "train.num_train_epochs": num_train_epochs}
    out.update(settings)
    return {key: value for key, value in out.items() if not (key == "train.num_train_epochs" and value is None)}


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


# ---- the preference methods' demo data (builtin:sort, builtin:sort-chat), registered by the core ----

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


def load_sort(name: str, split: str):
    """`sort` (standard) or `sort-chat` (conversational) preference pairs, split `train` or `test`: the chosen
    answer is the sorted list, the rejected one the same digits in a wrong order."""
    import datasets

    rows = sort_pairs(N_TRAIN, seed=0) if split == "train" else sort_pairs(N_TEST, seed=0, offset=N_TRAIN)
    if name == "sort-chat":
        rows = [_to_chat(r) for r in rows]
    return datasets.Dataset.from_list(rows)


#: the built-in preference datasets the core registers (alignkit.formatters' register_datasets)
SORT_DATASETS = ("sort", "sort-chat")
