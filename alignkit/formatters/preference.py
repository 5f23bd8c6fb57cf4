"""Preference data (`prompt`/`chosen`/`rejected`) -> [chosen; rejected] rows: prompt extraction, chat templates,
tokenization, truncation. The core registers it as `preference`; any pairwise method uses it.

Its rules (docs/data.md) reproduce the ids of TRL v0.15.2's pairwise preference trainers.
"""

from typing import Any

import torch

from alignkit.blocks.text import check_messages, column, extract_prompt, given_prompt, render_split, same_format
from alignkit.blocks.tokens import Encoder, pad_right, truncate_pair, with_bos, with_eos
from alignkit.errors import DataError
from alignkit.formatters.config import PreferenceDataConfig
from alignkit.formatters.vision import attach_vision, check_kept, has_images, pair_tokens
from alignkit.plugin.formatter import DataFormatter, DropExample, Formatted

__all__ = ["PreferenceDataConfig", "PreferenceFormatter"]


class PreferenceFormatter(DataFormatter):
    """`prompt`/`chosen`/`rejected` rows (standard or conversational, explicit or implicit prompt)."""

    config_class = PreferenceDataConfig
    reads_images = True  # conversational rows with images (alignkit.formatters.vision.pair_tokens)
    #: the prompt ids start with BOS (TRL's pairwise preference trainers): `alignkit generate` feeds them the same way
    bos_first = True

    #: an encoder-decoder gets the prompt in its encoder and each answer as decoder labels
    is_encoder_decoder: bool = False
    decoder_start_token_id: int | None = None

    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        self.num_proc = config.dataset_num_proc
        self.pad_id = config.padding_value if config.padding_value is not None else tokenizer.pad_token_id
        if self.pad_id is None:
            raise DataError("the tokenizer has no pad token; set method.padding_value")
        self.is_encoder_decoder = bool(config.is_encoder_decoder)
        # a huge text is never encoded whole: only the ids that truncation can keep
        self._encoder = Encoder(tokenizer, keep=config.max_length + 2)
        attach_vision(self, tokenizer)  # a vision-language model's processor: conversational rows with images

    def prepare_model(self, model) -> None:
        model_config = getattr(model, "config", None)
        if self.config.is_encoder_decoder is None:
            self.is_encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
        if self.is_encoder_decoder:
            self.decoder_start_token_id = getattr(model_config, "decoder_start_token_id", None)
            if self.decoder_start_token_id is None:
                raise DataError("the encoder-decoder model's config has no decoder_start_token_id")

    # ---- text ------------------------------------------------------------------------------------

    def texts(self, example: dict[str, Any]) -> tuple[str, str, str]:
        """The prompt, chosen and rejected strings, with the chat template applied where needed."""
        needs = "preference rows need 'chosen' and 'rejected' (and optionally 'prompt')"
        chosen, rejected = column(example, "chosen", needs), column(example, "rejected", needs)
        same_format(("chosen", chosen), ("rejected", rejected))
        prompt = given_prompt(example, "chosen", chosen)
        if prompt is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if isinstance(chosen, str):
            if not isinstance(prompt, str):
                raise DataError(f"'prompt' must be a string, got {type(prompt).__name__}")
            return prompt, chosen, rejected
        if not prompt:
            raise DataError("conversational rows need at least one prompt message")
        check_messages("prompt", prompt)
        prompt_text, (chosen_text, rejected_text) = render_split(self.tokenizer, prompt, chosen, rejected)
        return prompt_text, chosen_text, rejected_text

    # ---- ids ---------------------------------------------------------------------------------------

    def tokenize_answer(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of prompt + answer; a prompt token merged with the answer goes to it."""
        return self._encoder.pairs([(prompt, answer)])[0]

    def format(self, example: dict[str, Any]) -> Formatted:
        if has_images(example):
            return self._with_images(example)
        if self.is_encoder_decoder:
            return self._format_seq2seq(*self.texts(example))
        result = self.format_batch([example])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def format_batch(self, examples: list[dict[str, Any]]) -> list[Formatted | Exception]:
        """Every row's texts, then one tokenizer call for all their prompts and prompt + answer texts."""
        if self.is_encoder_decoder:
            return super().format_batch(examples)
        results: list[Formatted | Exception | tuple] = []
        for example in examples:
            try:
                results.append(self._with_images(example) if has_images(example) else self.texts(example))
            except (DataError, DropExample) as e:
                results.append(e)
        texts = [t for t in results if isinstance(t, tuple)]
        ids = iter(self._encoder.pairs([(p, a) for p, c, r in texts for a in (c, r)]))
        out: list[Formatted | Exception] = []
        for item in results:
            if not isinstance(item, tuple):
                out.append(item)
                continue
            try:
                formatted = self._assemble(*next(ids), *next(ids))
                out.append(Formatted({**formatted.features, **self._vision.features(None)}, formatted.truncated)
                           if self._vision is not None else formatted)
            except (DataError, DropExample) as e:
                out.append(e)
        return out

    def _with_images(self, example: dict[str, Any]) -> Formatted:
        """A conversational row with images: the prompt with its images through the processor, each answer after it
        (alignkit.formatters.vision.answers_tokens), then this formatter's BOS/EOS and truncation; truncation must
        keep the prompt's image tokens."""
        if self.is_encoder_decoder:
            raise DataError("rows with images need a decoder-only vision-language model")
        prompt, chosen, rejected, images = pair_tokens(self, example)
        formatted = self._assemble(prompt, chosen, prompt, rejected)
        if formatted.truncated:
            f = formatted.features
            check_kept(self._vision, [f["chosen_input_ids"], f["rejected_input_ids"]], prompt,
                       self.config.max_length)
        return Formatted({**formatted.features, **images}, formatted.truncated)

    def output_features(self):
        import datasets

        ids = datasets.Sequence(datasets.Value("int64"))
        columns = ("prompt_input_ids", "chosen_labels", "rejected_labels") if self.is_encoder_decoder else \
            ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        vision = getattr(self, "_vision", None)  # with a vision-language model's processor (attach_vision)
        return datasets.Features({**{c: ids for c in columns}, **(vision.output_features() if vision else {})})

    def _assemble(self, prompt_c: list[int], answer_c: list[int], prompt_r: list[int],
                  answer_r: list[int]) -> Formatted:
        """BOS/EOS, truncation and labels for one pair's prompt and answer ids."""
        c = self.config
        if abs(len(prompt_c) - len(prompt_r)) > 1 or sum(a != b for a, b in zip(prompt_c, prompt_r)) > 1:
            raise DataError("chosen and rejected tokenize the prompt differently by more than one token")
        bos, eos = self.tokenizer.bos_token_id if self.bos_first else None, self.tokenizer.eos_token_id
        prompts, answers, truncated = truncate_pair(
            [with_bos(prompt_c, bos), with_bos(prompt_r, bos)], [with_eos(answer_c, eos), with_eos(answer_r, eos)],
            c.max_length, c.max_prompt_length, c.truncation_mode)

        features = {"prompt_input_ids": prompts[0]}
        for side, p, a in zip(("chosen", "rejected"), prompts, answers):
            # The first position is never a target (logits are shifted by one): it needs one more token.
            if len(a) - (len(p) == 0) < 1:
                raise DropExample("no answer token left to score")
            features[f"{side}_input_ids"] = p + a
            features[f"{side}_labels"] = [c.label_pad_token_id] * len(p) + a
        return Formatted(features, truncated)

    def _format_seq2seq(self, prompt: str, chosen: str, rejected: str) -> Formatted:
        """Prompt ids for the encoder, answer ids as decoder labels; each tokenized with its special tokens
        and truncated on its own (max_prompt_length, max_completion_length)."""
        caps = (self.config.max_prompt_length, self.config.max_completion_length or 128,
                self.config.max_completion_length or 128)
        ids, truncated = [], False
        for text, cap in zip((prompt, chosen, rejected), caps):
            full = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            ids.append(self.tokenizer(text, truncation=True, max_length=cap, add_special_tokens=True)["input_ids"])
            truncated |= len(full) > cap
        if not ids[1] or not ids[2]:
            raise DropExample("an empty answer")
        return Formatted({"prompt_input_ids": ids[0], "chosen_labels": ids[1], "rejected_labels": ids[2]}, truncated)

    def _collate_seq2seq(self, features: list[dict[str, Any]]) -> dict:
        prompts = [f["prompt_input_ids"] for f in features] * 2
        labels = pad_right([f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features],
                           self.config.label_pad_token_id)
        decoder_input_ids = torch.full_like(labels, self.decoder_start_token_id)
        decoder_input_ids[:, 1:] = labels[:, :-1]
        decoder_input_ids[decoder_input_ids == self.config.label_pad_token_id] = self.tokenizer.pad_token_id
        return {"input_ids": pad_right(prompts, self.pad_id),
                "attention_mask": pad_right([[1] * len(p) for p in prompts], 0),
                "labels": labels, "decoder_input_ids": decoder_input_ids}

    def collate(self, features: list[dict[str, Any]]) -> dict:
        """Chosen rows then rejected rows, right-padded to one length: input_ids, attention_mask, labels
        (and decoder_input_ids, the labels shifted right, for an encoder-decoder)."""
        if self.is_encoder_decoder:
            return self._collate_seq2seq(features)
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        length = max(len(r) for r in rows)
        batch = {
            "input_ids": pad_right(rows, self.pad_id, length),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0, length),
            "labels": pad_right(labels, self.config.label_pad_token_id, length),
        }
        vision = getattr(self, "_vision", None)  # each pair's images for its chosen and again its rejected row
        return {**batch, **vision.collate(features, repeat=2)} if vision else batch
