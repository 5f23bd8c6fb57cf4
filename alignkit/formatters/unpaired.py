"""Unpaired preference rows (`prompt`, `completion`, `label`) -> completion sequences with the KL mismatch pairs,
as TRL 1.x's KTOTrainer prepares them. Paired rows (`prompt`/`chosen`/`rejected`, explicit or implicit prompt)
are unpaired first: chosen -> label True, rejected -> False.

Features: `prompt_input_ids`, `completion_input_ids` (prompt + completion ids), `completion_labels` (the prompt
masked), `label` (bool), and `KL_completion_input_ids`/`KL_completion_labels`: the same prompt followed by another
example's completion. The KL pairing is fixed here, at preprocessing, so a precomputed reference sees exactly the
pairs training sees: within consecutive groups of `kl_group_size` examples (default: each preprocessing batch),
example i gets the completion of example i - 1 and the first gets the last's (TRL's rotation).

Conversational rows with images (a vision-language model's processor, alignkit.formatters.vision): the prompt with its
images through the processor, the completion's rendered text after it (TRL 1.x's vision collator); the images belong
to the prompt, so an example's KL pair (its prompt, another completion) reads the example's own images: one set of
image features per example, collated for the completion rows and the KL rows alike.
"""

from typing import Any

import torch

from alignkit.blocks.text import column, extract_prompt, given_prompt, same_format
from alignkit.blocks.tokens import masked_labels, pad_right, truncate
from alignkit.errors import DataError
from alignkit.formatters.config import UnpairedDataConfig
from alignkit.formatters.sequence import EncodingFormatter, prompt_completion_ids
from alignkit.formatters.vision import answers_tokens, check_kept, has_images
from alignkit.plugin.formatter import DropExample, Formatted

PAIRED = "expected 'prompt', 'completion' and 'label' (or paired 'chosen' and 'rejected', optionally with 'prompt')"
WITH_IMAGES = "unpaired rows with images need conversational 'prompt' and 'completion' (or 'chosen' and 'rejected')"


class UnpairedPreferenceFormatter(EncodingFormatter):
    """`prompt` + `completion` + `label` rows, or paired rows unpaired as TRL's unpair_preference_dataset does."""

    config_class = UnpairedDataConfig
    #: conversational rows with images: the images belong to the prompt, so each KL pair reads its prompt's images
    reads_images = True

    def unpaired(self, example: dict[str, Any]) -> list[tuple[Any, Any, bool]]:
        """The (prompt, completion, label) rows of one raw row: one, or two for a paired row."""
        if "chosen" in example or "rejected" in example:
            chosen, rejected = column(example, "chosen", PAIRED), column(example, "rejected", PAIRED)
            same_format(("chosen", chosen), ("rejected", rejected))
            prompt = given_prompt(example, "chosen", chosen)
            if prompt is None:
                prompt, chosen, rejected = extract_prompt(chosen, rejected)
            return [(prompt, chosen, True), (prompt, rejected, False)]
        prompt, completion = column(example, "prompt", PAIRED), column(example, "completion", PAIRED)
        label = example.get("label")
        if not isinstance(label, bool):
            raise DataError(f"'label' must be true or false, got {label!r}" if "label" in example else
                            f"missing column 'label'; {PAIRED}")
        return [(prompt, completion, label)]

    def tokens(self, prompt, completion) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids): strings with the EOS text and the tokenizer's special tokens, conversations
        rendered; the completion starts where the ids diverge."""
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DataError("'prompt' and 'completion' must both be strings or both be conversations")
        if not isinstance(prompt, str) and not prompt:
            raise DataError("conversational rows need at least one prompt message")
        encoder = self._standard if isinstance(prompt, str) else self._rendered
        return prompt_completion_ids(self.tokenizer, encoder, prompt, completion)

    def image_tokens(self, example: dict[str, Any], prompt, completion) -> tuple[list[int], list[int], dict]:
        """(prompt ids, completion ids, image features) of a row with images (alignkit.formatters.vision)."""
        prompt_ids, (completion_ids,), features = answers_tokens(self, example, prompt, [completion], WITH_IMAGES)
        return prompt_ids, completion_ids, features

    def _sequence(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int], bool]:
        c = self.config
        ids, cut = truncate(prompt_ids + completion_ids, c.max_length, c.truncation_mode)
        labels, _ = truncate(masked_labels(len(prompt_ids), prompt_ids + completion_ids, c.label_pad_token_id),
                             c.max_length, c.truncation_mode)
        return ids, labels, cut

    def _example(self, prompt_ids: list[int], completion_ids: list[int], label: bool, images: dict) -> Formatted:
        c = self.config
        ids, labels, cut = self._sequence(prompt_ids, completion_ids)
        if all(x == c.label_pad_token_id for x in labels[1:]):
            raise DropExample("no completion token left to score")
        prompt, _ = truncate(prompt_ids, c.max_length, c.truncation_mode)
        if cut and self._vision is not None:
            check_kept(self._vision, [ids], prompt_ids, c.max_length)
        return Formatted({"prompt_input_ids": prompt, "completion_input_ids": ids, "completion_labels": labels,
                          "label": label, "_completion": completion_ids, "_prompt": prompt_ids, **images}, cut)

    def format(self, example: dict[str, Any]) -> list[Formatted]:
        """The row's examples with the KL pairs of this row alone (use format_batch for a dataset)."""
        result = self.format_batch([example])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def format_batch(self, examples: list[dict[str, Any]]) -> list:
        """Every row unpaired and tokenized, in TRL's order (a batch of paired rows gives all chosen examples, then
        all rejected ones), then the KL completions rotated within groups."""
        per_row: list = []  # per row: [(0 for a chosen or only example, 1 for a rejected one; the example)]
        for example in examples:
            try:
                made, no_images = [], self._vision.features(None) if self._vision is not None else {}
                for slot, (prompt, completion, label) in enumerate(self.unpaired(example)):
                    ids = (self.image_tokens(example, prompt, completion) if has_images(example)
                           else (*self.tokens(prompt, completion), no_images))
                    try:
                        made.append((slot, self._example(*ids[:2], label, ids[2])))
                    except DropExample:
                        pass
                per_row.append(made if made else DropExample("no completion token left to score"))
            except (DataError, DropExample) as e:
                per_row.append(e)
        rows = [r for r in per_row if isinstance(r, list)]
        firsts = [e for r in rows for slot, e in r if slot == 0]
        rest = [e for r in rows for slot, e in r if slot == 1]
        self._add_kl(firsts + rest)  # TRL's order: every chosen (or only) example, then the rejected ones
        out = [[e for slot, e in r if slot == 0] if isinstance(r, list) else r for r in per_row]
        last = max((i for i, r in enumerate(per_row) if isinstance(r, list)), default=None)
        if last is not None:
            out[last] += rest
        return out

    def _add_kl(self, examples: list[Formatted]) -> None:
        size = self.config.kl_group_size or len(examples) or 1
        for start in range(0, len(examples), size):
            group = examples[start:start + size]
            for j, example in enumerate(group):
                other = group[j - 1].features["_completion"]
                ids, labels, cut = self._sequence(example.features["_prompt"], other)
                if cut and self._vision is not None:  # the pair reads its prompt's images: their tokens must stay
                    check_kept(self._vision, [ids], example.features["_prompt"], self.config.max_length)
                example.features["KL_completion_input_ids"], example.features["KL_completion_labels"] = ids, labels
        for example in examples:
            del example.features["_completion"], example.features["_prompt"]

    def output_features(self):
        import datasets

        ids = datasets.Sequence(datasets.Value("int64"))
        return datasets.Features({"prompt_input_ids": ids, "completion_input_ids": ids, "completion_labels": ids,
                                  "label": datasets.Value("bool"), "KL_completion_input_ids": ids,
                                  "KL_completion_labels": ids,
                                  **(self._vision.output_features() if self._vision is not None else {})})

    def token_fields(self) -> list[tuple[str, str | None]]:
        return [("completion_input_ids", "completion_labels"), ("KL_completion_input_ids", "KL_completion_labels")]

    def describe(self, features: dict[str, Any]) -> list[str]:
        return [f"label: {'true (desirable)' if features['label'] else 'false (undesirable)'}"]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask`, `labels` of the completions, the same with a `KL_` prefix for
        the mismatched pairs, and `label` (bool tensor)."""
        batch = {"label": torch.tensor([bool(f["label"]) for f in features])}
        for prefix in ("", "KL_"):
            rows = [f[f"{prefix}completion_input_ids"] for f in features]
            batch[f"{prefix}input_ids"] = pad_right(rows, self.pad_id)
            batch[f"{prefix}attention_mask"] = pad_right([[1] * len(r) for r in rows], 0)
            batch[f"{prefix}labels"] = pad_right([f[f"{prefix}completion_labels"] for f in features],
                                                 self.config.label_pad_token_id)
        # each row's images, read by its completion row and its KL row alike (both hold its prompt)
        return {**batch, **(self._vision.collate(features) if self._vision is not None else {})}
