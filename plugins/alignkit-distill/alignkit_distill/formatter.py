"""The rows distill reads: prompt-completion rows (alignkit.formatters' PromptCompletionFormatter) and, when every
training step samples its completions (`lmbda` 1 or `seq_kd`), rows with a prompt alone, as TRL 1.16's
DistillationTrainer takes them: the prompt is rendered as a model sees it before its answer (a conversation with
the generation prompt) and nothing of it is trained; the rollout samples the completion."""

from typing import Any

from alignkit import DataError, Formatted
from alignkit.blocks.text import prompt_token_ids
from alignkit.blocks.tokens import truncate
from alignkit.formatters import PromptCompletionFormatter
from alignkit.formatters.vision import has_images


class DistillFormatter(PromptCompletionFormatter):
    def format(self, example: dict[str, Any]) -> Formatted:
        if example.get("prompt") is None or example.get("completion") is not None or has_images(example):
            return super().format(example)
        if not self.config.samples_every_step:
            raise DataError("the row has a prompt and no completion: method distill trains on the data's completions "
                            "on the steps that do not sample; set method.lmbda=1 (every step on the student's own "
                            "samples) or method.seq_kd=true (the teacher's), or give each row a 'completion'")
        ids = prompt_token_ids(self.tokenizer, example["prompt"])
        ids, truncated = truncate(ids, self.config.max_length, self.config.truncation_mode)
        return Formatted({"input_ids": ids, "labels": [self.config.label_pad_token_id] * len(ids),
                          **(self._vision.features(None) if self._vision is not None else {})}, truncated)
