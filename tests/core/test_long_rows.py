"""Huge rows: every formatter works on no more text than max_length tokens can hold, and its ids equal those of
the same formatter encoding every text whole."""

import random

import pytest

from alignkit.blocks.tokens import Encoder
from alignkit.formatters import PromptOnlyFormatter, SequenceFormatter, UnpairedPreferenceFormatter
from alignkit_orpo import ORPOMethodConfig, PreferenceFormatter
from helpers import chat


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["sort:", "1", "22", "333", "the", "sky", "is", "blue.", "héllo", "\n", "<|end|>", "  ", "=", "</s>"]
    return " ".join(rng.choice(vocab) for _ in range(n))


BIG, SMALL = words(20_000, 1), words(5, 2)
PAIRED = [{"prompt": BIG, "chosen": SMALL, "rejected": " 1"}, {"prompt": "sort: ", "chosen": BIG, "rejected": SMALL},
          {"prompt": BIG, "chosen": BIG + " 1", "rejected": words(20_000, 3)},
          {"chosen": BIG + " x", "rejected": BIG + " y"},
          {"prompt": [chat("user", BIG)], "chosen": [chat("assistant", SMALL)], "rejected": [chat("assistant", BIG)]}]


def unbounded(formatter):
    """The same formatter with every text encoded whole (the reference path)."""
    for name in ("_encoder", "_standard", "_rendered"):
        if hasattr(formatter, name):
            old = getattr(formatter, name)
            setattr(formatter, name, Encoder(formatter.tokenizer, None, add_special_tokens=old.special))
    return formatter


def results(formatter, rows):
    return [r.features if hasattr(r, "features") else [x.features for x in r] if isinstance(r, list) else repr(r)
            for r in formatter.format_batch(rows)]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_orpo_ids_on_huge_rows_equal_the_whole_text_path(tok, mode):
    config = ORPOMethodConfig(max_length=64, max_prompt_length=24, truncation_mode=mode)
    bounded = PreferenceFormatter(config, tok)
    assert bounded._encoder.is_long(BIG)
    assert results(bounded, PAIRED) == results(unbounded(PreferenceFormatter(config, tok)), PAIRED)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
@pytest.mark.parametrize("cls, rows", [
    (SequenceFormatter, [{"text": BIG}, {"prompt": BIG, "completion": SMALL}, {"prompt": SMALL, "completion": BIG},
                         {"messages": [chat("user", BIG), chat("assistant", BIG)]},
                         {"prompt": [chat("user", BIG)], "completion": [chat("assistant", SMALL)]}]),
    (SequenceFormatter,
     [{"messages": [chat("user", BIG), chat("assistant", BIG), chat("user", "q"), chat("assistant", SMALL)]},
                         {"prompt": [chat("user", BIG)], "completion": [chat("assistant", BIG)]},
                         {"prompt": [chat("user", SMALL)], "completion": [chat("assistant", BIG)]}]),
    (UnpairedPreferenceFormatter, PAIRED + [{"prompt": SMALL, "completion": BIG, "label": False}]),
    (PromptOnlyFormatter, [{"prompt": BIG}, {"prompt": [chat("user", BIG)]}]),
], ids=["sequence", "assistant-only", "unpaired", "prompt-only"])
def test_core_formatter_ids_on_huge_rows_equal_the_whole_text_path(tok, cls, rows, mode, request):
    extra = {"assistant_only_loss": True} if "assistant-only" in request.node.name else {}
    config = cls.config_class(name="t", max_length=48, truncation_mode=mode, **extra)
    assert results(cls(config, tok), rows) == results(unbounded(cls(config, tok)), rows)
