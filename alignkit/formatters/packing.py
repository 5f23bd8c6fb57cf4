"""Packing: several tokenized examples per row, without attention or position leakage between them."""

from typing import Any


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
