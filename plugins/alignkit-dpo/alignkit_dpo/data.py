"""DPO's vision-language demo data: `builtin:shapes-dpo`, a picture of coloured shapes and a question about it, the
right answer chosen and another answer to the same question rejected (conversational preference rows with an
`images` column; the text demo uses the core's builtin:sort)."""

import datasets


def shapes_dpo(split: str) -> datasets.Dataset:
    from alignkit.blocks.shapes import assistant_turn, questions, user_turn

    return datasets.Dataset.from_list([{"images": [r["image"]], "prompt": user_turn(r["question"]),
                                        "chosen": assistant_turn(r["answer"]), "rejected": assistant_turn(r["wrong"])}
                                       for r in questions(split)])


DATASETS = {"shapes-dpo": shapes_dpo}
