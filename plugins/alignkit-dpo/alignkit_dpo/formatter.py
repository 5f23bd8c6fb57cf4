"""Preference pairs tokenized as TRL 1.16's DPOTrainer does: prompt + answer encoded whole (a string answer gets the
EOS text, the tokenizer's own BOS rules; a conversation is rendered by the chat template), the answers starting where
the prompt's own ids stop agreeing with either sequence, each sequence cut to `max_length`, a row whose prompt alone
fills `max_length` dropped (keep_start). Batches as the core's `preference` formatter: [chosen; rejected] rows."""

from typing import Any, Literal

from pydantic import Field

from alignkit import DataError, DropExample, Formatted
from alignkit.blocks.text import check_messages, column, extract_prompt, given_prompt, same_format
from alignkit.blocks.tokens import masked_labels, truncate
from alignkit.formatters import PreferenceFormatter
from alignkit.formatters.config import TokenDataConfig
from alignkit.formatters.sequence import EncodingFormatter, prompt_completion_ids
from alignkit.formatters.vision import check_kept, has_images, pair_tokens


class DPODataConfig(TokenDataConfig):
    truncation_mode: Literal["keep_start", "keep_end"] = Field(
        "keep_start", description="Which end of an over-long sequence to keep (TRL 1.16: keep_end is deprecated).")


class DPOFormatter(EncodingFormatter):
    """`prompt`/`chosen`/`rejected` rows (standard or conversational, explicit or implicit prompt) -> TRL 1.16's ids."""

    config_class = DPODataConfig
    collate = PreferenceFormatter.collate  # with each pair's images (alignkit.formatters.vision)
    output_features = PreferenceFormatter.output_features
    is_encoder_decoder = False
    reads_images = True  # conversational rows with images (alignkit.formatters.vision.pair_tokens)

    def format(self, example: dict[str, Any]) -> Formatted:
        if has_images(example):
            pc, ac, ar, images = pair_tokens(self, example)
            return self._assemble(pc, ac, pc, ar, images)
        pc, ac, pr, ar = self._pair_ids(example)
        return self._assemble(pc, ac, pr, ar, self._vision.features(None) if self._vision else {})

    def _pair_ids(self, example: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int]]:
        needs = "preference rows need 'chosen' and 'rejected' (and optionally 'prompt')"
        chosen, rejected = column(example, "chosen", needs), column(example, "rejected", needs)
        same_format(("chosen", chosen), ("rejected", rejected))
        prompt = given_prompt(example, "chosen", chosen)
        if prompt is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if isinstance(prompt, str) != isinstance(chosen, str):
            raise DataError("'prompt' and the answers must both be strings or both be conversations")
        if not isinstance(prompt, str):
            if not prompt:
                raise DataError("conversational rows need at least one prompt message")
            check_messages("prompt", prompt)
        encoder = self._standard if isinstance(prompt, str) else self._rendered
        (pc, ac), (pr, ar) = (prompt_completion_ids(self.tokenizer, encoder, prompt, a) for a in (chosen, rejected))
        return pc, ac, pr, ar

    def _assemble(self, pc, ac, pr, ar, images: dict[str, list]) -> Formatted:
        n = min(len(pc), len(pr))  # TRL: the answers start where either stops agreeing with the prompt's ids
        c = self.config
        if c.max_length is not None and c.truncation_mode == "keep_start" and n >= c.max_length:
            raise DropExample("the prompt alone fills max_length")
        features, cut = {"prompt_input_ids": pc[:n]}, False
        for side, full in (("chosen", pc + ac), ("rejected", pr + ar)):
            ids, cut_here = truncate(full, c.max_length, c.truncation_mode)
            features[f"{side}_input_ids"] = ids
            features[f"{side}_labels"] = truncate(masked_labels(n, full, c.label_pad_token_id), c.max_length,
                                                  c.truncation_mode)[0]
            cut |= cut_here
        if cut and images:
            check_kept(self._vision, [features["chosen_input_ids"], features["rejected_input_ids"]], pc, c.max_length)
        return Formatted({**features, **images}, cut)
