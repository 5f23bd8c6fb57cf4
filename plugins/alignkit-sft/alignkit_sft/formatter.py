"""SFT's formatter: the core sequence formatter, plus pre-tokenized rows as TRL 1.x's SFTTrainer takes them.

A row with `input_ids` is already tokenized: its `labels` are used as given; without them the labels are the ids,
with `label_pad_token_id` where `assistant_masks` is 0 and, only with `completion_only_loss: true`, where
`completion_mask` is 0 (TRL: a pre-tokenized row is not a prompt-completion row, so the completion mask is off by
default). Then, as every row: truncated to `max_length` (unless packing) and dropped when no trained token is left.

Conversations in the `from`/`value` style (a `conversations` column, or messages with those keys) are read as
ChatML `messages` (`role`/`content`), as TRL's maybe_convert_to_chatml does.

Packed rows also carry `seq_lengths` (the length of each example in the row, as TRL's packed rows); eval rows are
packed per `eval_packing` (null: as the training rows). With `packing_strategy: wrapped` the examples of each
preprocessing batch are concatenated and cut every `max_length` tokens (one sequence per row, TRL's "wrapped").
"""

import copy
from typing import Any

from alignkit import DataError, DataFormatter, DropExample, Formatted
from alignkit.blocks.tokens import truncate
from alignkit.formatters import SequenceFormatter


class SFTFormatter(SequenceFormatter):
    """Language-modeling, prompt-completion or pre-tokenized (`input_ids`) rows -> `input_ids`, `labels`."""

    def format(self, example: dict[str, Any]) -> Formatted:
        if example.get("input_ids") is None:
            return super().format(chatml(example))
        c = self.config
        ids, labels = list(example["input_ids"]), pretokenized_labels(example, c)
        truncated = False
        if not c.packing:
            ids, truncated = truncate(ids, c.max_length, c.truncation_mode)
            labels, _ = truncate(labels, c.max_length, c.truncation_mode)
        kept = labels[1:c.max_length] if c.packing else labels[1:]
        if all(label == c.label_pad_token_id for label in kept):
            raise DropExample("no trained token left")
        images = self._vision.features(None) if self._vision is not None else {}
        return Formatted({"input_ids": ids, "labels": labels, **images}, truncated)

    def for_split(self, split: str) -> "SFTFormatter":
        packing = getattr(self.config, "eval_packing", None)
        if split != "eval" or packing is None or packing == self.config.packing:
            return self
        other = copy.copy(self)
        other.config = self.config.model_copy(update={"packing": packing})
        return other

    def format_batch(self, examples: list[dict[str, Any]]) -> list:
        if self.config.packing and getattr(self.config, "packing_strategy", "bfd") == "wrapped":
            results = wrapped(DataFormatter.format_batch(self, examples), self.config.max_length)
        else:
            results = super().format_batch(examples)
        if self.config.packing:
            for row in (r for rows in results if isinstance(rows, list) for r in rows):
                starts = [i for i, p in enumerate(row.features["position_ids"]) if p == 0] + [
                    len(row.features["position_ids"])]
                row.features["seq_lengths"] = [b - a for a, b in zip(starts, starts[1:])]
        return results

    def output_features(self):
        import datasets

        features = super().output_features()
        if self.config.packing:
            features["seq_lengths"] = datasets.Sequence(datasets.Value("int64"))
        return features


def pretokenized_labels(example: dict[str, Any], config) -> list[int]:
    """The labels of a pre-tokenized row: its own, or its ids masked by its mask columns (TRL 1.x's rule)."""
    ids = list(example["input_ids"])
    if example.get("labels") is not None:
        labels = list(example["labels"])
        if len(labels) != len(ids):
            raise DataError(f"'labels' has {len(labels)} entries and 'input_ids' {len(ids)}; give one label per id")
        return labels
    names = ["assistant_masks"] + (["completion_mask"] if config.completion_only_loss else [])
    masks = [(name, list(example[name])) for name in names if example.get(name) is not None]
    for name, mask in masks:
        if len(mask) != len(ids):
            raise DataError(f"'{name}' has {len(mask)} entries and 'input_ids' {len(ids)}; give one per id")
    return [i if all(m[k] for _, m in masks) else config.label_pad_token_id for k, i in enumerate(ids)]


def chatml(example: dict[str, Any]) -> dict[str, Any]:
    """The row with `from`/`value` messages as `role`/`content` and a `conversations` column as `messages`."""
    def converted(value):
        if not isinstance(value, list) or not any(isinstance(m, dict) and ("from" in m or "value" in m)
                                                  for m in value):
            return value
        return [{("role" if k == "from" else "content" if k == "value" else k): v for k, v in m.items()}
                if isinstance(m, dict) else m for m in value]

    out = {k: converted(v) if k in ("prompt", "completion", "messages", "conversations") else v
           for k, v in example.items()}
    if out.get("conversations") is not None:  # (TRL's rename)
        out["messages"] = out["conversations"]
    out.pop("conversations", None)
    return out


def wrapped(results: list, max_length: int) -> list:
    """TRL's wrapped packing: the formatted examples' ids and labels concatenated in order and cut every
    `max_length` tokens, each row one sequence (position ids 0..n-1); held by the first formatted row's slot."""
    formatted = [(i, r) for i, r in enumerate(results) if isinstance(r, Formatted)]
    if not formatted:
        return results
    ids = [t for _, r in formatted for t in r.features["input_ids"]]
    labels = [t for _, r in formatted for t in r.features["labels"]]
    cuts = [slice(k, k + max_length) for k in range(0, len(ids), max_length)]
    rows = [Formatted({"input_ids": ids[c], "labels": labels[c], "position_ids": list(range(len(ids[c])))})
            for c in cuts]
    out = [r if not isinstance(r, Formatted) else [] for r in results]
    out[formatted[0][0]] = rows
    return out
