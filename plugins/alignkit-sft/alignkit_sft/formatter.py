"""SFT data: language-modeling rows (`text` / `messages`) and prompt-completion rows, standard and
conversational, chosen per row by its shape, as TRL 1.x's SFTTrainer prepares them.

Features: `input_ids`, `labels` (label_pad_token_id where not trained); with packing, `position_ids`
restarting at 0 for each packed example.
"""

from typing import Any

import torch

from alignkit import DataError, DataFormatter, DropExample, Formatted, pad_right
from alignkit_sft.config import SFTDataConfig


def _conversational(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value) and bool(value)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SFTFormatter(DataFormatter):
    config_class = SFTDataConfig

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        self.num_proc = config.dataset_num_proc

    # ---- one row -----------------------------------------------------------------------------------

    def format(self, example: dict[str, Any]) -> Formatted:
        c = self.config
        if "prompt" in example and "completion" in example:
            ids, completion_mask, assistant_mask = self._prompt_completion(example["prompt"], example["completion"])
            only_completion = c.completion_only_loss is not False
        elif "messages" in example or c.dataset_text_field in example:
            value = example["messages"] if "messages" in example else example[c.dataset_text_field]
            ids, assistant_mask = self._language_modeling(value)
            completion_mask, only_completion = None, False
            if c.completion_only_loss:
                raise DataError("method.completion_only_loss=true needs prompt-completion rows; this row has "
                                f"{'messages' if 'messages' in example else c.dataset_text_field!r}")
        else:
            raise DataError(f"expected columns 'prompt' and 'completion', 'messages', or {c.dataset_text_field!r} "
                            f"(method.dataset_text_field); the row has {', '.join(map(repr, example)) or 'none'}")
        keep = [(completion_mask[i] if only_completion else 1) and (assistant_mask[i] if assistant_mask else 1)
                for i in range(len(ids))]
        labels = [t if k else c.label_pad_token_id for t, k in zip(ids, keep)]
        truncated = c.max_length is not None and len(ids) > c.max_length and not c.packing
        if truncated:
            cut = slice(None, c.max_length) if c.truncation_mode == "keep_start" else slice(-c.max_length, None)
            ids, labels = ids[cut], labels[cut]
        if all(label == c.label_pad_token_id for label in labels):
            raise DropExample("no trained token left")
        return Formatted({"input_ids": ids, "labels": labels}, truncated=truncated)

    def _tokenize_chat(self, messages: list[dict], **kwargs) -> dict[str, list[int]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("conversational row, but the tokenizer has no chat template")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        except Exception as e:  # jinja errors: bad roles, missing content ...
            raise DataError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}") from None

    def _assistant_mask(self, out: dict) -> list[int] | None:
        if not self.config.assistant_only_loss:
            return None
        mask = list(out.get("assistant_masks") or [])
        if 1 not in mask:
            raise DataError("method.assistant_only_loss=true, but no assistant token is marked (the chat template needs "
                            "{% generation %} markers around assistant turns)")
        return mask

    def _language_modeling(self, value: Any) -> tuple[list[int], list[int] | None]:
        if _conversational(value):
            out = self._tokenize_chat(value, return_assistant_tokens_mask=self.config.assistant_only_loss)
            return list(out["input_ids"]), self._assistant_mask(out)
        if not isinstance(value, str):
            raise DataError(f"expected a string or a list of messages, got {type(value).__name__}")
        if self.config.assistant_only_loss:
            raise DataError("method.assistant_only_loss=true needs conversational rows (lists of messages)")
        return list(self.tokenizer(text=self._with_eos(value))["input_ids"]), None

    def _prompt_completion(self, prompt: Any, completion: Any) -> tuple[list[int], list[int], list[int] | None]:
        if _conversational(prompt) and _conversational(completion):
            prompt_ids = self._tokenize_chat(prompt, add_generation_prompt=True)["input_ids"]
            out = self._tokenize_chat(prompt + completion, return_assistant_tokens_mask=self.config.assistant_only_loss)
            ids, assistant_mask = list(out["input_ids"]), self._assistant_mask(out)
        elif isinstance(prompt, str) and isinstance(completion, str):
            if self.config.assistant_only_loss:
                raise DataError("method.assistant_only_loss=true needs conversational rows (lists of messages)")
            prompt_ids = self.tokenizer(text=prompt)["input_ids"]
            ids, assistant_mask = list(self.tokenizer(text=prompt + self._with_eos(completion))["input_ids"]), None
        else:
            raise DataError("'prompt' and 'completion' must both be strings or both be lists of messages, got "
                            f"{type(prompt).__name__} and {type(completion).__name__}")
        n = common_prefix_length(prompt_ids, ids)
        return ids, [0] * n + [1] * (len(ids) - n), assistant_mask

    def _with_eos(self, text: str) -> str:
        eos = self.tokenizer.eos_token
        return text if eos is None or text.endswith(eos) else text + eos

    # ---- batches -----------------------------------------------------------------------------------

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids and labels; an attention mask, or the position ids of packed rows."""
        pad_id = self.tokenizer.pad_token_id
        batch = {"input_ids": pad_right([f["input_ids"] for f in features], pad_id),
                 "labels": pad_right([f["labels"] for f in features], self.config.label_pad_token_id)}
        if "position_ids" in features[0]:
            batch["position_ids"] = pad_right([f["position_ids"] for f in features], 0)
        else:
            batch["attention_mask"] = pad_right([[1] * len(f["input_ids"]) for f in features], 0)
        return batch


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit decreasing: each example (cut to max_length) goes into the fullest row it still fits in.
    Each packed row holds `input_ids`, `labels` and `position_ids` restarting at 0 for every example."""
    rows: list[list[dict[str, list[int]]]] = []
    space: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        ex = {"input_ids": ex["input_ids"][:max_length], "labels": ex["labels"][:max_length]}
        fits = [i for i, s in enumerate(space) if s >= len(ex["input_ids"])]
        if fits:
            i = min(fits, key=lambda i: space[i])
            rows[i].append(ex)
            space[i] -= len(ex["input_ids"])
        else:
            rows.append([ex])
            space.append(max_length - len(ex["input_ids"]))
    return [{"input_ids": [t for e in row for t in e["input_ids"]], "labels": [t for e in row for t in e["labels"]],
             "position_ids": [p for e in row for p in range(len(e["input_ids"]))]} for row in rows]
