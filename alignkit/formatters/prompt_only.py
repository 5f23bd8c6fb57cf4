"""Prompt-only rows (for online methods): `prompt` -> `prompt_input_ids`, every column kept for reward functions.

With a vision-language model's processor, a row with `images` has its prompt (a conversation with `{"type": "image"}`
parts, an all-string conversation, or text with the processor's image token) rendered and its image placeholders
expanded by the processor; the image features it returns (`pixel_values`, ...) are kept as the row's features, one
list per row in the batch, for the rollout to repeat for each of the prompt's completions (alignkit.online.groups).
"""

from typing import Any

from alignkit.blocks.text import column, prompt_token_ids, render_prompt
from alignkit.blocks.tokens import pad_right, truncate, with_bos
from alignkit.errors import DataError
from alignkit.formatters.config import PromptOnlyDataConfig
from alignkit.formatters.sequence import EncodingFormatter
from alignkit.formatters.vision import IMAGES, has_images, text_only_model, with_image_parts
from alignkit.plugin.formatter import Formatted


class PromptOnlyFormatter(EncodingFormatter):
    """`prompt` rows, standard or conversational. A string prompt is encoded with the tokenizer's own special
    tokens; a conversation is rendered with the chat template (a generation prompt after a user message, the final
    message continued after an assistant one). Over-long prompts keep `max_length` tokens (`truncation_mode`,
    default keep_end). The row's other columns (and `prompt` itself) pass through unchanged, e.g. an `answer`
    for a reward function."""

    config_class = PromptOnlyDataConfig

    def prompt_ids(self, prompt) -> list[int]:
        """The shared prompt rendering, encoded bounded in memory (a huge prompt is never encoded whole)."""
        return prompt_token_ids(self.tokenizer, prompt, self.bos_first,
                                lambda text, special: (self._standard if special else self._rendered).texts([text])[0])

    def image_prompt(self, prompt, example: dict[str, Any]) -> tuple[list[int], dict[str, list]]:
        """(ids, image features) of a prompt with the row's images, through the processor: a conversation rendered
        by the chat template, a string with the tokenizer's BOS first where it adds one to text."""
        vision = self._vision
        if vision is None:
            raise text_only_model(len(example[IMAGES]))
        images = vision.images(example)
        if not isinstance(prompt, str):
            prompt = with_image_parts(prompt, len(images))
        vision.check_count([prompt], len(images))
        ids, features = vision.encode(prompt if isinstance(prompt, str) else render_prompt(self.tokenizer, prompt),
                                      images)
        bos = self.tokenizer.bos_token_id
        if isinstance(prompt, str) and bos is not None and self.tokenizer("x")["input_ids"][:1] == [bos]:
            ids = with_bos(ids, bos)
        return ids, features

    def format(self, example: dict[str, Any]) -> Formatted:
        prompt = column(example, "prompt", "prompt-only data needs a 'prompt' column")
        if has_images(example):
            ids, images = self.image_prompt(prompt, example)
        else:
            ids, images = self.prompt_ids(prompt), (self._vision.features(None) if self._vision is not None else {})
        full = ids
        ids, cut = truncate(ids, self.config.max_length, self.config.truncation_mode)
        if cut and self._vision is not None and self._vision.image_tokens(ids) != self._vision.image_tokens(full):
            raise DataError(f"the row's image tokens do not fit in method.max_length={self.config.max_length} (its "
                            f"prompt has {len(full)} tokens); raise method.max_length")
        return Formatted({**example, "prompt_input_ids": ids, **images}, cut)

    def token_fields(self) -> list[tuple[str, str | None]]:
        return [("prompt_input_ids", None)]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """`prompt_input_ids` right-padded with its `prompt_attention_mask`; every other column (the image features
        too: one entry per row) as a list."""
        rows = [f["prompt_input_ids"] for f in features]
        batch: dict[str, Any] = {k: [f[k] for f in features] for k in features[0] if k != "prompt_input_ids"}
        batch["prompt_input_ids"] = pad_right(rows, self.pad_id)
        batch["prompt_attention_mask"] = pad_right([[1] * len(r) for r in rows], 0)
        return batch



