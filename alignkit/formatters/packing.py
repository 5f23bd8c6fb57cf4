"""Packing: several tokenized examples per row, without attention or position leakage between them."""

from typing import Any

from alignkit.formatters.vision import vision_inputs


def pack(examples: list[dict[str, Any]], max_length: int, label_pad: int) -> list[tuple[dict[str, list[int]], bool]]:
    """Best fit decreasing: longest example first, each into the row with the least room that still holds it.

    Each example (`input_ids`, `labels`) is cut to its first `max_length` tokens. A packed row holds the
    concatenated ids and labels and `position_ids` restarting at 0 for each example; the first label of each
    example is `label_pad`, so no example is trained to predict the next one's first token (unpacked, that
    position is never a target either). Returns (row, whether any of its examples was cut).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(len(examples[i]["input_ids"]), max_length)
        fits = [r for r in range(len(rows)) if room[r] >= n]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(i)
            room[best] -= n
        else:
            rows.append([i])
            room.append(max_length - n)
    out = []
    for row in rows:
        ids, labels, positions, cut = [], [], [], False
        for i in row:
            e = examples[i]
            n = min(len(e["input_ids"]), max_length)
            cut |= n < len(e["input_ids"])
            ids += e["input_ids"][:n]
            labels += [label_pad] + e["labels"][1:n]
            positions += range(n)
        out.append(({"input_ids": ids, "labels": labels, "position_ids": positions}, cut))
    return out


# ---- reading a batch of SequenceFormatter rows, packed (`position_ids`, no attention mask) or padded ----

def model_inputs(batch: dict) -> dict:
    """The forward's inputs: packed rows go in with their position ids and no attention mask (transformers then
    keeps attention within each example: it starts a new one wherever the position ids restart); rows with images
    bring their image inputs (alignkit.formatters.vision)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **vision_inputs(batch)}


def trained_labels(batch: dict, ignore: int = -100):
    """The labels with `ignore` wherever nothing trains: in a packed row, the first token of each example is never
    predicted from the example before it."""
    if "position_ids" not in batch:
        return batch["labels"]
    return batch["labels"].masked_fill(batch["position_ids"] == 0, ignore)


def input_tokens(batch: dict) -> int:
    """Real (non-padding) input tokens of the batch. Packed rows carry no attention mask: padding there is position 0
    not followed by position 1 (every packed example has at least two tokens, or it would train nothing)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    positions_BT = batch["position_ids"]
    real_BT = positions_BT != 0
    real_BT[:, :-1] |= positions_BT[:, 1:] == 1
    return int(real_BT.sum())


def trained_tokens(batch: dict, ignore: int = -100) -> int:
    """How many positions of the batch train (the labels past the first token that are not `ignore`)."""
    return int((trained_labels(batch, ignore)[:, 1:] != ignore).sum())
