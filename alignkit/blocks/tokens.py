"""Token building blocks: encode text (batched, bounded in memory for huge rows), split prompt from completion
ids with the merge rule, add BOS/EOS, truncate, and mask labels.

All text is encoded with `add_special_tokens=False`; BOS and EOS are added by `with_bos`/`with_eos` (or, for
formatters that follow the tokenizer's own rules, by `Encoder(..., add_special_tokens=True)`).
"""

from collections.abc import Sequence
from typing import Literal

import torch

TruncationMode = Literal["keep_start", "keep_end"]

#: extra tokens a text window must yield beyond those kept, so that the cut edge never reaches them
MARGIN = 16


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token can cover: the longest entry of the vocabulary (byte-level vocabularies
    spell each byte as one character, so this bounds bytes too). A text of more than `n * max_chars_per_token`
    characters has more than `n` tokens."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=64) or 1


def split_merged(alone: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    """Split the ids of prompt + completion where the prompt's own ids end; a last prompt token that merged with
    the completion's first characters goes to the completion."""
    start = len(alone) - (alone != full[: len(alone)])
    return full[:start], full[start:]


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading ids two sequences share."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def split_common(alone: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    """Split the ids of prompt + completion where they stop agreeing with the prompt's own ids (TRL 1.x's rule
    for prompt-completion data: a merged or differently rendered prompt end goes to the completion)."""
    n = common_prefix_length(alone, full)
    return full[:n], full[n:]


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """`ids` with `bos` first, unless there is none or it is already first."""
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """`ids` with `eos` last, unless there is none or it is already last."""
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def truncate(ids: list, max_length: int | None, mode: TruncationMode = "keep_start") -> tuple[list, bool]:
    """(ids cut to `max_length`: the first tokens with keep_start, the last with keep_end; whether it cut)."""
    if max_length is None or len(ids) <= max_length:
        return ids, False
    return (ids[:max_length] if mode == "keep_start" else ids[-max_length:]), True


def truncate_pair(prompts: Sequence[list[int]], completions: Sequence[list[int]], max_length: int,
                  max_prompt_length: int, mode: TruncationMode) -> tuple[list[list[int]], list[list[int]], bool]:
    """Prompt-first truncation of completions sharing one prompt (each completion with its own prompt ids).

    With `longer` = the longest completion: when prompt + longer exceeds max_length, each prompt keeps
    max_prompt_length tokens (its end with keep_end, its start with keep_start); when still too long, each
    completion keeps its first max_length - max_prompt_length tokens. Returns (prompts, completions, truncated).
    """
    longer = max(len(c) for c in completions)
    truncated = False
    out_prompts = []
    for p in prompts:
        if len(p) + longer > max_length:
            p = p[:max_prompt_length] if mode == "keep_start" else p[-max_prompt_length:]
            truncated = True
        out_prompts.append(p)
    out_completions = []
    for p, c in zip(out_prompts, completions):
        if len(p) + longer > max_length:
            c = c[: max_length - max_prompt_length]
            truncated = True
        out_completions.append(c)
    return out_prompts, out_completions, truncated


def masked_labels(prompt_len: int, ids: list[int], label_pad: int) -> list[int]:
    """Labels for prompt + completion ids: the prompt's `prompt_len` positions set to `label_pad`."""
    return [label_pad] * prompt_len + ids[prompt_len:]


def labels_where(ids: list[int], mask: Sequence[int], label_pad: int) -> list[int]:
    """Labels keeping `ids` where `mask` is 1 and `label_pad` elsewhere."""
    return [i if m else label_pad for i, m in zip(ids, mask)]


class Encoder:
    """Encodes text for one tokenizer: many strings per call, and bounded memory for huge ones.

    With `keep=None` every text is encoded whole. With `keep=n`, a text too long to fit in n tokens is never
    encoded whole: the result is a *stand-in* made of its exact first n ids and exact last n ids (the middle is
    left out), found by encoding windows of about n * max_chars_per_token characters at each end. Any
    truncation that keeps at most n tokens from either end therefore gives exactly the ids the whole text gives,
    while memory stays proportional to n, not to the text. Choose n above every length the caller keeps
    (e.g. max_length + 2, for BOS and EOS).
    """

    def __init__(self, tokenizer, keep: int | None = None, add_special_tokens: bool = False) -> None:
        self.tokenizer, self.keep, self.special = tokenizer, keep, add_special_tokens
        self.window = None if keep is None else (keep + MARGIN) * max_chars_per_token(tokenizer)
        self._backend_matches: bool | None = None

    # ---- whole texts -------------------------------------------------------------------------------

    def encode(self, strings: list[str]) -> list[list[int]]:
        """Token ids of each string, in one call: the fast tokenizer's Rust batch encoder (parallel, no offsets)
        once it has been seen to give the tokenizer's own ids, else the tokenizer."""
        if not strings:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._backend_matches is None:
            sample = strings[:8]
            self._backend_matches = backend is not None and hasattr(backend, "encode_batch_fast") and \
                [e.ids for e in backend.encode_batch_fast(sample, add_special_tokens=self.special)] == \
                self.tokenizer(sample, add_special_tokens=self.special)["input_ids"]
        if self._backend_matches:
            return [e.ids for e in backend.encode_batch_fast(strings, add_special_tokens=self.special)]
        return self.tokenizer(strings, add_special_tokens=self.special)["input_ids"]

    def is_long(self, text: str) -> bool:
        """Whether `text` has too many characters to be encoded whole (then it has more than `keep` tokens)."""
        return self.window is not None and len(text) > self.window

    # ---- bounded -----------------------------------------------------------------------------------

    def texts(self, strings: list[str]) -> list[list[int]]:
        """`encode`, with a stand-in (exact first and last `keep` ids) for each long string."""
        short = iter(self.encode([s for s in strings if not self.is_long(s)]))
        return [self._stand_in(s) if self.is_long(s) else next(short) for s in strings]

    def pairs(self, pairs: list[tuple[str, str]], split=split_merged) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) of each (prompt, completion): prompt + completion is encoded whole and
        split against the prompt's own ids by `split` (the merge rule, or `split_common`). Long parts get
        stand-ins."""
        short = [(p, c) for p, c in pairs if not (self.is_long(p) or self.is_long(c))]
        unique = list(dict.fromkeys(s for p, c in short for s in (p, p + c)))
        ids = dict(zip(unique, self.encode(unique)))
        return [split(ids[p], ids[p + c]) if not (self.is_long(p) or self.is_long(c)) else self._long_pair(p, c, split)
                for p, c in pairs]

    def _window(self, text: str, side: str) -> list[int]:
        """The exact first (side "start") or last ("end") `keep` ids of a long text."""
        return self._window_chars(text, side)[0]

    def _window_chars(self, text: str, side: str) -> tuple[list[int], int]:
        """(ids, window length): the exact first or last `keep` ids of a long text, from a window of it that yields
        MARGIN tokens more, checked against a window half as long again (grown until they agree)."""
        keep, chars = self.keep, self.window
        while chars < len(text):
            cut = (lambda n: text[:n]) if side == "start" else (lambda n: text[-n:])
            ids = self.encode([cut(chars), cut(chars * 3 // 2)])
            ends = [i[:keep] if side == "start" else i[-keep:] for i in ids]
            if len(ids[0]) >= keep + MARGIN and ends[0] == ends[1]:
                return ends[0], chars
            chars *= 2
        ids = self.encode([text])[0]
        return (ids[:keep] if side == "start" else ids[-keep:]), len(text)

    def with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """`texts([text])[0]` and, for each of those ids, the character of `text` where its token starts (to mark
        tokens by character spans), still bounded in memory for a long text."""
        if not self.is_long(text):
            enc = self.tokenizer(text, add_special_tokens=self.special, return_offsets_mapping=True)
            return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
        ids, starts = [], []
        for side in ("start", "end"):
            part, chars = self._window_chars(text, side)
            window = text[:chars] if side == "start" else text[len(text) - chars:]
            enc = self.tokenizer(window, add_special_tokens=self.special, return_offsets_mapping=True)
            offsets = enc["offset_mapping"][:len(part)] if side == "start" else enc["offset_mapping"][-len(part):]
            shift = 0 if side == "start" else len(text) - chars
            ids += part
            starts += [start + shift for start, _ in offsets]
        return ids, starts

    def _stand_in(self, text: str) -> list[int]:
        return self._window(text, "start") + self._window(text, "end")

    def _long_pair(self, prompt: str, completion: str, split) -> tuple[list[int], list[int]]:
        """The merge rule on the prompt's end and the completion's start (windows around the boundary), plus the
        exact far ends of whichever part is long."""
        keep, chars = self.keep, self.window
        while True:
            p_cut, c_cut = len(prompt) > chars, len(completion) > chars
            p_win = prompt[-chars:] if p_cut else prompt
            c_win = completion[:chars] if c_cut else completion
            alone, full = self.encode([p_win, p_win + c_win])
            p_ids, c_ids = split(alone, full)
            if (not p_cut or len(p_ids) >= keep + MARGIN) and (not c_cut or len(c_ids) >= keep + MARGIN):
                break
            chars *= 2
        if p_cut:
            p_ids = self._window(prompt, "start") + p_ids[-keep:]
        if c_cut:
            c_ids = c_ids[:keep] + self._window(completion, "end")
        return p_ids, c_ids


def pad_right(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ints to a common length (the longest, or `length`) as a LongTensor."""
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
