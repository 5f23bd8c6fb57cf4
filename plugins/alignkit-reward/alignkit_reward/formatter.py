"""Preference rows -> [chosen; rejected] sequences as TRL 1.16's RewardTrainer tokenizes them.

Each side is one sequence, tokenized whole (never prompt and answer apart, so no token straddles a cut): a
standard row as `tokenizer(prompt + answer + eos)` (EOS text appended unless the answer ends with it; the
tokenizer's own special tokens, e.g. BOS, as it adds them), a conversational row as the chat template of its
prompt messages followed by the answer's (`tools` and `chat_template_kwargs` columns passed on), with nothing
appended. An implicit prompt (no `prompt` column) is simply part of each answer. A pair with a side longer than
`max_length` is dropped, not truncated. An optional `margin` column (a number per pair) goes into the batch.

A row with `chosen_ids` and `rejected_ids` (TRL 1.16's names; or the older `chosen_input_ids` and
`rejected_input_ids`) is already tokenized: its ids are used as given, with the same `max_length` rule.
"""

import json
import math
from typing import Any

import torch

from alignkit import DataError, DataFormatter, DropExample, Formatted, pad_right
from alignkit.blocks.text import column, given_prompt, is_conversation, same_format
from alignkit.blocks.tokens import Encoder

NEEDS = "reward rows need 'chosen' and 'rejected' (and optionally 'prompt' and 'margin')"


class RewardFormatter(DataFormatter):
    """`prompt`/`chosen`/`rejected` rows (standard or conversational, explicit or implicit prompt) and an optional
    `margin`, or pre-tokenized `chosen_ids`/`rejected_ids` -> `chosen_ids`, `rejected_ids` (and `margin`); batches
    of the B chosen rows then the B rejected rows (`input_ids`, `attention_mask`, `margin` [B])."""

    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        self.num_proc = config.dataset_num_proc
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
        # bounds memory on huge rows: a text with more characters than max_length + 2 tokens can span is dropped
        self._bound = Encoder(tokenizer, keep=config.max_length + 2) if config.max_length is not None else None

    def sequence_ids(self, prompt, completion, row: dict | None = None) -> list[int]:
        """The ids of prompt + completion as one scored sequence (prompt None: an implicit prompt, already in the
        completion). A conversational completion may be a string: it is then the assistant's turn."""
        return self._encode(*self._source(prompt, completion, row or {}))

    def _source(self, prompt, completion, row: dict) -> tuple[str | list, dict | None]:
        """(the text, None) of a standard sequence, or (its messages, the chat template's keywords)."""
        if isinstance(completion, str) and (prompt is None or isinstance(prompt, str)):
            eos = self.tokenizer.eos_token
            return (prompt or "") + completion + (eos if eos and not completion.endswith(eos) else ""), None
        turn = completion if is_conversation(completion) else [{"role": "assistant", "content": completion}]
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        return list(prompt or []) + list(turn), {"tools": tools, **(row.get("chat_template_kwargs") or {})}

    def _encode(self, source: str | list, chat_kwargs: dict | None) -> list[int]:
        if chat_kwargs is None:
            return list(self.tokenizer(source)["input_ids"])
        out = self.tokenizer.apply_chat_template(source, tokenize=True, return_dict=True, **chat_kwargs)
        return list(out["input_ids"])

    def _too_long(self, source: str | list, chat_kwargs: dict | None) -> bool:
        """Whether the sequence has more characters than max_length tokens can hold (then it is not encoded)."""
        if self._bound is None:
            return False
        text = source if chat_kwargs is None else self.tokenizer.apply_chat_template(source, tokenize=False,
                                                                                     **chat_kwargs)
        return self._bound.is_long(text)

    def format(self, example: dict[str, Any]) -> Formatted:
        given = pretokenized(example)
        if given is not None:
            return self._checked(given, example)
        chosen, rejected = column(example, "chosen", NEEDS), column(example, "rejected", NEEDS)
        same_format(("chosen", chosen), ("rejected", rejected))
        prompt = given_prompt(example, "chosen", chosen)
        if prompt is not None and not isinstance(prompt, str):
            prompt = column(example, "prompt")  # the messages checked
        limit = self.config.max_length
        sources = [self._source(prompt, answer, example) for answer in (chosen, rejected)]
        if any(self._too_long(*source) for source in sources):  # a huge text is never encoded whole
            raise DropExample(f"a sequence longer than method.max_length={limit}")
        return self._checked({f"{side}_ids": self._encode(*source)
                              for side, source in zip(("chosen", "rejected"), sources)}, example)

    def _checked(self, features: dict[str, Any], example: dict[str, Any]) -> Formatted:
        """The pair's ids, dropped when a side is longer than max_length; the row's margin added."""
        limit = self.config.max_length
        if limit is not None and max(len(ids) for ids in features.values()) > limit:
            raise DropExample(f"a sequence longer than method.max_length={limit}")
        if "margin" in example:
            features["margin"] = _margin(example["margin"])
        return Formatted(features)

    def token_fields(self) -> list[tuple[str, str | None]]:
        return [("chosen_ids", None), ("rejected_ids", None)]

    def describe(self, features: dict[str, Any]) -> list[str]:
        lines = super().describe(features)
        return lines + ["no token is a label: the classifier reads every token, and its score at each sequence's last "
                        "token is that sequence's reward"]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        batch = {"input_ids": pad_right(rows, self.pad_id),
                 "attention_mask": pad_right([[1] * len(r) for r in rows], 0)}
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        return batch


#: the pre-tokenized column pairs, TRL 1.16's names first (the second pair is the older name TRL still reads)
TOKENIZED = (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids"))


def pretokenized(example: dict[str, Any]) -> dict[str, list[int]] | None:
    """A pre-tokenized row's ids as {"chosen_ids", "rejected_ids"}, checked: two non-empty lists of token ids. None
    for a text row."""
    for names in TOKENIZED:
        if all(example.get(name) is not None for name in names):
            out = {}
            for name, key in zip(names, ("chosen_ids", "rejected_ids")):
                ids = example[name]
                if (not isinstance(ids, (list, tuple)) or not ids
                        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
                    raise DataError(f"'{name}' must be a non-empty list of token ids (non-negative integers), got "
                                    f"{type(ids).__name__} {str(ids)[:40]!r}")
                out[key] = list(ids)
            return out
        if any(example.get(name) is not None for name in names):
            missing = [name for name in names if example.get(name) is None]
            raise DataError(f"a pre-tokenized reward row needs both {names[0]!r} and {names[1]!r}; "
                            f"{missing[0]!r} is missing")
    return None


def _margin(value) -> float:
    """A row's `margin`: a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"'margin' must be a finite number (how much the chosen answer should win by), got "
                        f"{type(value).__name__} {str(value)[:40]!r}")
    return float(value)
