"""The KL mismatch pairs of a batch.

`fixed` (default): the pairs the "unpaired-preference" formatter made at preprocessing (`KL_input_ids`,
`KL_attention_mask`, `KL_labels`): each example's prompt with another example's completion, the same
whatever the batching, so the reference log-probs of the pairs can be precomputed.

`batch`: built here from the micro-batch itself, each row's prompt followed by the previous row's completion
(the first row gets the last row's), so the mismatched completions are exactly the batch's own completions
(what the KTO paper and TRL aim for) whatever the shuffling. The pairs then depend on the batching, and
precomputed reference log-probs could not match them: that combination is refused.
"""

import torch

from alignkit import DataError, pad_right
from alignkit.formatters.vision import vision_inputs


def rotated_pairs(batch: dict[str, torch.Tensor], ignore: int, max_length: int | None,
                  truncation_mode: str = "keep_start") -> dict[str, torch.Tensor]:
    """`KL_input_ids`, `KL_attention_mask`, `KL_labels` of row i = prompt i + completion i-1 (prompt first;
    over max_length cut as the formatter cuts)."""
    keep = batch["attention_mask"].bool()
    prompts, completions = [], []
    for ids, labels, real in zip(batch["input_ids"], batch["labels"], keep):
        ids, labels = ids[real].tolist(), labels[real].tolist()
        start = next((t for t, label in enumerate(labels) if label != ignore), len(labels))
        prompts.append(ids[:start])
        completions.append(ids[start:])
    rows, label_rows = [], []
    for i, prompt in enumerate(prompts):
        ids, labels = prompt + completions[i - 1], [ignore] * len(prompt) + completions[i - 1]
        if max_length is not None and len(ids) > max_length:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, labels = ids[cut], labels[cut]
        rows.append(ids)
        label_rows.append(labels)
    device = batch["input_ids"].device
    return {"KL_input_ids": pad_right(rows, 0).to(device),
            "KL_attention_mask": pad_right([[1] * len(r) for r in rows], 0).to(device),
            "KL_labels": pad_right(label_rows, ignore).to(device)}


def kl_pairs(batch: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The batch's KL pairs under `config.kl_pairing`."""
    ignore = getattr(config, "label_pad_token_id", -100)
    if config.kl_pairing == "batch":  # row i's prompt, so row i's images
        return {**vision_inputs(batch), **rotated_pairs(batch, ignore, getattr(config, "max_length", None),
                                                         getattr(config, "truncation_mode", "keep_start"))}
    if "KL_input_ids" not in batch:
        raise DataError("loss_type kto needs the KL mismatch pairs (KL_input_ids) that the 'unpaired-preference' "
                        "formatter makes; this formatter made none: use that formatter, or set method.kl_pairing=batch")
    return batch
