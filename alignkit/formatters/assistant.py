"""Which tokens of a conversation belong to assistant turns (for `assistant_only_loss`)."""

import re

from alignkit.blocks.text import common_prefix, render
from alignkit.errors import DataError

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_tokens(tokenizer, messages: list[dict], encoder=None) -> tuple[list[int], list[int]]:
    """(ids of the rendered conversation, 1 where a token belongs to an assistant turn, else 0).

    A chat template with `{% generation %}` blocks marks the turns itself (as TRL reads it); otherwise each
    assistant turn is found by rendering: it starts where the conversation up to it, rendered with a generation
    prompt, stops agreeing with the conversation including it, and ends where the latter ends. A conversation too
    long for `encoder` (an `alignkit.blocks.tokens.Encoder` with `keep`) is marked by rendering, on its stand-in ids.
    """
    if encoder is not None and encoder.is_long(render(tokenizer, messages)):
        ids, mask = _by_rendering(tokenizer, messages, encoder)
    elif GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _by_rendering(tokenizer, messages)
    if 1 not in mask:
        raise DataError("method.assistant_only_loss=true, but the conversation has no assistant turn to train on")
    return ids, mask


def _by_rendering(tokenizer, messages: list[dict], encoder=None) -> tuple[list[int], list[int]]:
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1])
        header = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        if not text.startswith(upto):
            raise DataError("method.assistant_only_loss=true: the chat template renders a conversation's turns "
                            "differently as it grows; add {% generation %} blocks to it to mark assistant turns")
        spans.append((len(common_prefix(header, upto)), len(upto)))
    if encoder is None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    else:
        ids, starts = encoder.with_starts(text)
    return ids, [int(any(s <= start < e for s, e in spans)) for start in starts]
