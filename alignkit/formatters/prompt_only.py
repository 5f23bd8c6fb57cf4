"""Prompt-only rows (for online methods): `prompt` -> `prompt_input_ids`, every column kept for reward functions."""

from typing import Any

from alignkit.blocks.text import column, prompt_token_ids
from alignkit.blocks.tokens import pad_right, truncate
from alignkit.formatters.config import PromptOnlyDataConfig
from alignkit.formatters.sequence import EncodingFormatter
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

    def format(self, example: dict[str, Any]) -> Formatted:
        prompt = column(example, "prompt", "prompt-only data needs a 'prompt' column")
        ids, cut = truncate(self.prompt_ids(prompt), self.config.max_length, self.config.truncation_mode)
        return Formatted({**example, "prompt_input_ids": ids}, cut)

    def token_fields(self) -> list[tuple[str, str | None]]:
        return [("prompt_input_ids", None)]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """`prompt_input_ids` right-padded with its `prompt_attention_mask`; every other column as a list."""
        rows = [f["prompt_input_ids"] for f in features]
        batch: dict[str, Any] = {k: [f[k] for f in features] for k in features[0] if k != "prompt_input_ids"}
        batch["prompt_input_ids"] = pad_right(rows, self.pad_id)
        batch["prompt_attention_mask"] = pad_right([[1] * len(r) for r in rows], 0)
        return batch



