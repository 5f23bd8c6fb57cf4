"""The reward method's built-in demo data `builtin:sort-reward`: preference pairs for sorting digits.

Each list of digits (alignkit.blocks.demo) gives one pair: the prompt, the sorted answer (chosen) and the same
digits in a wrong order (rejected), the rows of the core's `builtin:sort`. Train and test lists never overlap.
"""

import datasets

from alignkit.blocks.demo import N_TEST, N_TRAIN, sort_pairs

NAME = "sort-reward"


def load(split: str) -> datasets.Dataset:
    rows = sort_pairs(N_TRAIN, seed=0) if split == "train" else sort_pairs(N_TEST, seed=0, offset=N_TRAIN)
    return datasets.Dataset.from_list(rows)
