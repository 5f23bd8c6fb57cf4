"""A neutral generator for vision-language demo data: pictures of coloured shapes drawn with Pillow at run time, with
questions about their colour, shape and count (answers of one word or digit).

Each 32x32 picture holds 1 to 3 shapes of one kind and one colour, each in its own 16x16 quadrant (13x13 pixels,
nearly filling it), on a white ground. Train and test pictures come from separate random streams. Plugins build
their rows from `questions` (e.g. prompt-completion rows, or preference pairs of a right and a wrong answer) and
register them with the `register_datasets` hook. The core registers `builtin:shapes-pairs` (preference) and
`builtin:shapes-prompts` (prompt-only, for online methods).
"""

import random

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
QUESTIONS = {"colour": "What colour are the shapes?", "shape": "Which shape is drawn?",
             "count": "How many shapes are there?"}
N_TRAIN, N_TEST = 1500, 200
SIZE = 32


def picture(colour: str, shape: str, count: int, rng: random.Random):
    """A white 32x32 picture with `count` shapes, each in a random quadrant at an offset of 1 or 2 pixels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for q in rng.sample(range(4), count):
        x0, y0 = (q % 2) * 16 + rng.randint(1, 2), (q // 2) * 16 + rng.randint(1, 2)
        box = (x0, y0, x0 + 12, y0 + 12)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + 6, y0), (x0, y0 + 12), (x0 + 12, y0 + 12)], fill=fill)
    return image


def answers(kind: str) -> list[str]:
    return list(COLOURS) if kind == "colour" else list(SHAPES) if kind == "shape" else [str(c) for c in COUNTS]


def questions(split: str) -> list[dict]:
    """Rows {image, question, answer, wrong} of a split: `wrong` is another answer to the same question."""
    rng = random.Random(1 if split == "train" else 2)
    rows = []
    for _ in range(N_TRAIN if split == "train" else N_TEST):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(COUNTS)
        kind = rng.choice(list(QUESTIONS))
        answer = {"colour": colour, "shape": shape, "count": str(count)}[kind]
        wrong = rng.choice([a for a in answers(kind) if a != answer])
        rows.append({"image": picture(colour, shape, count, rng), "question": QUESTIONS[kind], "answer": answer,
                     "wrong": wrong})
    return rows


def user_turn(question: str) -> list[dict]:
    """The prompt conversation of a row: one user turn with the picture and the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


#: the preference demo data the core registers: the right answer chosen, another answer to the question rejected
SHAPES_PAIRS = "shapes-pairs"


def load_shapes_pairs(split: str):
    """`builtin:shapes-pairs`: conversational preference rows with an `images` column."""
    import datasets

    return datasets.Dataset.from_list([{"images": [r["image"]], "prompt": user_turn(r["question"]),
                                        "chosen": assistant_turn(r["answer"]), "rejected": assistant_turn(r["wrong"])}
                                       for r in questions(split)])


#: the prompt-only demo data the core registers: the question about the picture, and its answer for exact-match
SHAPES_PROMPTS = "shapes-prompts"


def load_shapes_prompts(split: str):
    """`builtin:shapes-prompts`: conversational prompt-only rows with an `images` column and the `answer` column
    (the `exact-match` reward reads it)."""
    import datasets

    return datasets.Dataset.from_list([{"images": [r["image"]], "prompt": user_turn(r["question"]),
                                        "answer": r["answer"]} for r in questions(split)])
