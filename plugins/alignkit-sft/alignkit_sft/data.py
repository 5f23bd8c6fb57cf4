"""SFT's demo data: sort a list of digits, as prompt-completion rows ("sort: 3 1 2 =" -> " 1 2 3").

Built from the core's digit-list generator (the same lists as the preference demo), train and
held-out test splits that never share a prompt.
"""

import datasets

from alignkit.blocks.demo import prompt, split_lists, words


def _rows(split: str) -> list[dict[str, str]]:
    return [{"prompt": prompt(d), "completion": " " + words(sorted(d))} for d in split_lists(split)]


def sort_sft(split: str) -> datasets.Dataset:
    """`builtin:sort-sft`: standard prompt-completion rows."""
    return datasets.Dataset.from_list(_rows(split))


def sort_sft_chat(split: str) -> datasets.Dataset:
    """`builtin:sort-sft-chat`: the same rows as conversations (a user turn, an assistant turn)."""
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"].removesuffix(" =")}],
         "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in _rows(split)])


def shapes_sft(split: str) -> datasets.Dataset:
    """`builtin:shapes-sft`: a picture of coloured shapes and a question about it, answered in one word or digit
    (conversational prompt-completion rows with an `images` column; for vision-language models)."""
    from alignkit.blocks.shapes import assistant_turn, questions, user_turn

    return datasets.Dataset.from_list([{"images": [r["image"]], "prompt": user_turn(r["question"]),
                                        "completion": assistant_turn(r["answer"])} for r in questions(split)])


DATASETS = {"sort-sft": sort_sft, "sort-sft-chat": sort_sft_chat, "shapes-sft": shapes_sft}
