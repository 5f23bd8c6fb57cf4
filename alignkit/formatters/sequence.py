"""Language-modeling and prompt-completion rows -> `input_ids` + `labels`, as TRL 1.x's SFTTrainer prepares them.

Rows (TRL's dataset types, standard or conversational):

- language modeling: `text` (the column named by `dataset_text_field`) or `messages`;
- prompt-completion: `prompt` and `completion`, both strings or both conversations.

Standard text gets the tokenizer's EOS *text* appended unless it already ends with it and is tokenized with the
tokenizer's own special tokens (as TRL). Conversations are rendered with the chat template (no EOS added: the
template ends the turn). The completion starts where the prompt's ids and the prompt + completion ids diverge (the
common-prefix rule). Labels are the ids, with `label_pad_token_id` where not trained: the prompt when
`completion_only_loss` (default on for prompt-completion rows), non-assistant tokens when `assistant_only_loss`.
Over-long examples keep `max_length` tokens (`truncation_mode`); an example left with no trained token is dropped.
With `packing`, examples are packed into rows of up to `max_length` tokens (best fit decreasing) with
`position_ids` restarting per example.
"""

from typing import Any

import torch

from alignkit.blocks.text import column, common_prefix, is_conversation, render, same_format
from alignkit.blocks.tokens import Encoder, common_prefix_length, labels_where, pad_right, split_common, truncate
from alignkit.errors import DataError
from alignkit.formatters.assistant import assistant_tokens
from alignkit.formatters.config import SequenceDataConfig
from alignkit.formatters.packing import pack
from alignkit.formatters.vision import IMAGES, attach_vision, has_images, sequence_tokens
from alignkit.plugin.formatter import DataFormatter, DropExample, Formatted

LANGUAGE_MODELING, PROMPT_COMPLETION = "language-modeling", "prompt-completion"


def pad_id(config, tokenizer) -> int:
    """The input-ids pad: `padding_value`, else the tokenizer's pad token; a DataError when there is neither."""
    value = getattr(config, "padding_value", None)
    value = tokenizer.pad_token_id if value is None else value
    if value is None:
        raise DataError("the tokenizer has no pad token; set method.padding_value")
    return value


def with_eos_text(text: str, eos: str | None) -> str:
    """`text` ending with the EOS token's text (TRL appends it to standard text before tokenizing)."""
    return text if eos is None or text.endswith(eos) else text + eos


def prompt_completion_ids(tokenizer, encoder: Encoder, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a prompt-completion row, as TRL 1.x tokenizes prompt-completion data.

    Strings: the completion gets the EOS text, prompt and prompt + completion are encoded with `encoder` (made with
    `add_special_tokens=True` to follow the tokenizer's own BOS rules). Conversations: the prompt is rendered with a
    generation prompt, prompt + completion rendered whole, and `encoder` should not add special tokens. Either way
    the completion starts where the two id sequences diverge (`split_common`).
    """
    if isinstance(prompt, str):
        return encoder.pairs([(prompt, with_eos_text(completion, tokenizer.eos_token))], split=split_common)[0]
    alone = render(tokenizer, prompt, add_generation_prompt=True)
    full = render(tokenizer, prompt + completion)
    if full.startswith(alone):  # split the text first: a huge row stays bounded
        return encoder.pairs([(alone, full[len(alone):])], split=split_common)[0]
    return split_common(*encoder.texts([alone, full]))


class EncodingFormatter(DataFormatter):
    """Base of the formatters that encode standard text and chat-template renderings bounded by `max_length` (their
    config has `dataset_num_proc`, `padding_value` and `max_length`): sets `num_proc`, `pad_id` and two encoders
    that never encode a huge text whole, `_standard` (the tokenizer's special tokens) and `_rendered` (none); with a
    vision-language model's processor, `_vision` (alignkit.formatters.vision) for rows with images."""

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        self.num_proc = config.dataset_num_proc
        self.pad_id = pad_id(config, tokenizer)
        keep = None if config.max_length is None else config.max_length + 2
        self._standard = Encoder(tokenizer, keep, add_special_tokens=True)  # the tokenizer's own BOS/EOS rules
        self._rendered = Encoder(tokenizer, keep)  # chat-template text carries its own special tokens
        attach_vision(self, tokenizer)  # a vision-language model's processor: rows with images


class SequenceFormatter(EncodingFormatter):
    """Language-modeling or prompt-completion rows (each row's columns decide) -> `input_ids`, `labels`."""

    config_class = SequenceDataConfig
    reads_images = True
    #: the row types this formatter accepts
    shapes: tuple[str, ...] = (LANGUAGE_MODELING, PROMPT_COMPLETION)

    def check_data(self, dataset, source: str, pm=None, run=None) -> None:
        if self.config.packing and IMAGES in dataset.column_names and any(dataset[IMAGES]):
            raise DataError(f"{source}: method.packing=true cannot pack rows with images (each row's images belong to "
                            "its own positions); set method.packing=false")

    # ---- tokens --------------------------------------------------------------------------------------

    def shape(self, example: dict[str, Any]) -> str:
        """The row's type by the columns it fills (datasets gives a row null for a column only other rows have)."""
        present, text = {k for k, v in example.items() if v is not None}, self.config.dataset_text_field
        if "prompt" in present or "completion" in present:
            shape = PROMPT_COMPLETION
        elif "messages" in present or text in present:
            shape = LANGUAGE_MODELING
            if "messages" in present and text in present and text != "messages":
                raise DataError(f"the row has both '{text}' and 'messages'; give one of them per row")
        else:
            shape = None
        if shape not in self.shapes:
            wanted = {LANGUAGE_MODELING: f"'{self.config.dataset_text_field}' or 'messages'",
                      PROMPT_COMPLETION: "'prompt' and 'completion'"}
            raise DataError(f"expected columns {' or '.join(wanted[s] for s in self.shapes)}; the row has "
                            f"{', '.join(repr(k) for k in example) or 'none'}")
        return shape

    def tokens(self, example: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(ids, trained mask) of one row, before truncation."""
        if self.shape(example) == LANGUAGE_MODELING:
            name = "messages" if example.get("messages") is not None else self.config.dataset_text_field
            value = column(example, name)
            if self.config.completion_only_loss:
                raise DataError(f"method.completion_only_loss=true needs prompt-completion rows ('prompt' and "
                                f"'completion'); this row is language modeling ('{name}'), with no prompt to mask: set "
                                "completion_only_loss to null or false")
            if is_conversation(value):
                if all(m["role"] == "system" for m in value):
                    raise DataError(f"'{name}' holds only system messages; a conversation to train on needs a user "
                                    "or assistant turn")
                return self._conversation(value)
            self._no_assistant_only()
            ids = self._standard.texts([with_eos_text(value, self.tokenizer.eos_token)])[0]
            return ids, [1] * len(ids)
        needs = "prompt-completion rows need 'prompt' and 'completion'"
        prompt, completion = column(example, "prompt", needs), column(example, "completion", needs)
        conversational = same_format(("prompt", prompt), ("completion", completion))
        if conversational:
            full_ids, mask, n = self._conversation_pair(prompt, completion)
        else:
            self._no_assistant_only()
            p, c = prompt_completion_ids(self.tokenizer, self._standard, prompt, completion)
            full_ids, mask, n = p + c, [1] * (len(p) + len(c)), len(p)
        if self.config.completion_only_loss is not False:
            mask = [0] * n + mask[n:]
        return full_ids, mask

    def _no_assistant_only(self) -> None:
        if self.config.assistant_only_loss:
            raise DataError("method.assistant_only_loss=true needs conversational rows (lists of messages)")

    def _conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        if self.config.assistant_only_loss:
            return assistant_tokens(self.tokenizer, messages, self._rendered)
        ids = self._rendered.texts([render(self.tokenizer, messages)])[0]
        return ids, [1] * len(ids)

    def _conversation_pair(self, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int], int]:
        if self.config.assistant_only_loss:
            full_ids, mask = assistant_tokens(self.tokenizer, prompt + completion, self._rendered)
            alone = render(self.tokenizer, prompt, add_generation_prompt=True)
            full = render(self.tokenizer, prompt + completion)
            if not self._rendered.is_long(full):
                return full_ids, mask, common_prefix_length(self._rendered.texts([alone])[0], full_ids)
            # a huge conversation: the completion starts at the first token past the shared text
            boundary = len(common_prefix(alone, full))
            return full_ids, mask, sum(start < boundary for start in self._rendered.with_starts(full)[1])
        p, c = prompt_completion_ids(self.tokenizer, self._rendered, prompt, completion)
        return p + c, [1] * (len(p) + len(c)), len(p)

    # ---- examples ------------------------------------------------------------------------------------

    def format(self, example: dict[str, Any]) -> Formatted:
        c = self.config
        images = {}
        if has_images(example):
            ids, mask, images = sequence_tokens(self, example)
        else:
            ids, mask = self.tokens(example)
            images = self._vision.features(None) if self._vision is not None else {}
        labels = labels_where(ids, mask, c.label_pad_token_id)
        truncated, full_ids = False, ids
        if not c.packing:
            ids, truncated = truncate(ids, c.max_length, c.truncation_mode)
            labels, _ = truncate(labels, c.max_length, c.truncation_mode)
        kept = labels[1:c.max_length] if c.packing else labels[1:]  # packing keeps an example's first max_length
        if all(label == c.label_pad_token_id for label in kept):
            raise DropExample("no trained token left")
        if truncated and images and self._vision.image_tokens(ids) != self._vision.image_tokens(full_ids):
            raise DataError(f"the row's image tokens do not fit in method.max_length={c.max_length} (it has "
                            f"{len(full_ids)} tokens); raise method.max_length")
        return Formatted({"input_ids": ids, "labels": labels, **images}, truncated)

    def format_batch(self, examples: list[dict[str, Any]]) -> list:
        results = super().format_batch(examples)
        if not self.config.packing:
            return results
        formatted = [(i, r) for i, r in enumerate(results) if isinstance(r, Formatted)]
        if not formatted:
            return results
        rows = pack([r.features for _, r in formatted], self.config.max_length, self.config.label_pad_token_id)
        out = [r if not isinstance(r, Formatted) else [] for r in results]
        out[formatted[0][0]] = [Formatted(row, truncated) for row, truncated in rows]
        return out

    def output_features(self):
        import datasets

        ids = datasets.Sequence(datasets.Value("int64"))
        names = ("input_ids", "labels", "position_ids") if self.config.packing else ("input_ids", "labels")
        images = self._vision.output_features() if self._vision is not None else {}
        return datasets.Features({**{n: ids for n in names}, **images})

    def token_fields(self) -> list[tuple[str, str | None]]:
        return [("input_ids", "labels")]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids` and `labels`, and an `attention_mask`; packed rows get `position_ids` instead
        (no attention mask: the model then keeps attention inside each packed example; call it with
        `use_cache=False`)."""
        batch = {"input_ids": pad_right([f["input_ids"] for f in features], self.pad_id),
                 "labels": pad_right([f["labels"] for f in features], self.config.label_pad_token_id)}
        if "position_ids" in features[0]:
            batch["position_ids"] = pad_right([f["position_ids"] for f in features], 0)
        else:
            batch["attention_mask"] = pad_right([[1] * len(f["input_ids"]) for f in features], 0)
        if self._vision is not None:
            batch.update(self._vision.collate(features))
        return batch


class LanguageModelingFormatter(SequenceFormatter):
    """`text` or `messages` rows: every token trained (assistant turns only with `assistant_only_loss`)."""

    shapes = (LANGUAGE_MODELING,)


class PromptCompletionFormatter(SequenceFormatter):
    """`prompt` + `completion` rows: the completion trained (the whole sequence with `completion_only_loss: false`)."""

    shapes = (PROMPT_COMPLETION,)
