"""Preference data -> ORPO features: prompt extraction, chat templates, tokenization, truncation.

Every rule follows docs/orpo.md (and TRL v0.15.2's ORPOTrainer, whose ids it reproduces).
"""

from typing import Any

import torch

from alignkit import DataError, DataFormatter, DropExample, Formatted, pad_right
from alignkit_orpo.config import PreferenceDataConfig

ROLES = ("system", "user", "assistant", "tool")


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _check_messages(column: str, messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"'{column}' message {i} needs string 'role' and 'content', got {sorted(m)}")
        if m["role"] not in ROLES:
            raise DataError(f"'{column}' message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off: the longest common prefix (characters or messages).

    A space just before the split point goes to the completions; when one is a prefix of the other,
    the last common element goes to both completions (TRL's behaviour).
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise DataError("'chosen' and 'rejected' must be non-empty to extract an implicit prompt")
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def split_answer(alone: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    """Split the ids of prompt + answer where the prompt's own ids end; a last prompt token that merged
    with the answer's first characters goes to the answer."""
    start = len(alone) - (alone != full[: len(alone)])
    return full[:start], full[start:]


def common_prefix(*texts: str) -> str:
    n = 0
    for chars in zip(*texts):
        if len(set(chars)) > 1:
            break
        n += 1
    return texts[0][:n]


class PreferenceFormatter(DataFormatter):
    """`prompt`/`chosen`/`rejected` rows (standard or conversational, explicit or implicit prompt)."""

    config_class = PreferenceDataConfig

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
        for column in ("chosen", "rejected"):
            if column not in example:
                raise DataError(f"missing column '{column}'; ORPO needs 'chosen' and 'rejected' (and optionally 'prompt')")
            value = example[column]
            if value is None or not (isinstance(value, str) or is_conversation(value)):
                raise DataError(f"'{column}' must be a string or a list of {{role, content}} messages, "
                                f"got {type(value).__name__}")
            if value == "":
                raise DataError(f"'{column}' is an empty string")
        chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise DataError("'chosen' and 'rejected' must both be strings or both be conversations")
        if prompt is None or is_conversation(prompt) != is_conversation(chosen):
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if isinstance(chosen, str):
            if not isinstance(prompt, str):
                raise DataError(f"'prompt' must be a string, got {type(prompt).__name__}")
            return prompt, chosen, rejected
        return self._render(prompt, chosen, rejected)

    def _render(self, prompt: list, chosen: list, rejected: list) -> tuple[str, str, str]:
        for column, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            _check_messages(column, messages)
        if not prompt:
            raise DataError("conversational rows need at least one prompt message")
        if self.tokenizer.chat_template is None:
            raise DataError("the data is conversational but the tokenizer has no chat template; "
                            "set model.tokenizer_name_or_path to one that has")
        last = prompt[-1]["role"]
        if last not in ("user", "assistant"):
            raise DataError(f"the prompt's last message must be from 'user' or 'assistant', not {last!r}")
        render = self.tokenizer.apply_chat_template
        prompt_text = render(prompt, tokenize=False, add_generation_prompt=last == "user",
                             continue_final_message=last == "assistant")
        full_chosen = render(prompt + chosen, tokenize=False)
        full_rejected = render(prompt + rejected, tokenize=False)
        # Templates may render a prompt alone differently from inside the conversation: keep the shared part.
        prompt_text = common_prefix(prompt_text, full_chosen, full_rejected)
        return prompt_text, full_chosen[len(prompt_text):], full_rejected[len(prompt_text):]

    # ---- ids ---------------------------------------------------------------------------------------

    def tokenize_answer(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of prompt + answer; a prompt token merged with the answer goes to it."""
        full = self.tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        alone = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return split_answer(alone, full)

    def format(self, example: dict[str, Any]) -> Formatted:
        prompt, chosen, rejected = self.texts(example)
        if self.is_encoder_decoder:
            return self._format_seq2seq(prompt, chosen, rejected)
        return self._assemble(*self.tokenize_answer(prompt, chosen), *self.tokenize_answer(prompt, rejected))

    def format_batch(self, examples: list[dict[str, Any]]) -> list[Formatted | Exception]:
        """`format` for many rows with one tokenizer call for all their prompts and prompt + answer texts."""
        if self.is_encoder_decoder:
            return super().format_batch(examples)
        results: list[Formatted | Exception | tuple] = []
        for example in examples:
            try:
                results.append(self.texts(example))
            except DataError as e:
                results.append(e)
        texts = [t for t in results if isinstance(t, tuple)]
        ids = iter(self._encode([s for p, c, r in texts for s in (p, p + c, p + r)]))
        out: list[Formatted | Exception] = []
        for item in results:
            if not isinstance(item, tuple):
                out.append(item)
                continue
            alone, full_c, full_r = next(ids), next(ids), next(ids)
            try:
                out.append(self._assemble(*split_answer(alone, full_c), *split_answer(alone, full_r)))
            except (DataError, DropExample) as e:
                out.append(e)
        return out

    _backend_matches: bool | None = None

    def _encode(self, strings: list[str]) -> list[list[int]]:
        """Token ids of many strings in one call: the fast tokenizer's Rust batch encoder (parallel, no offsets)
        once it has been seen to give the tokenizer's own ids, else the tokenizer."""
        if not strings:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._backend_matches is None:
            sample = strings[:8]
            self._backend_matches = backend is not None and hasattr(backend, "encode_batch_fast") and \
                [e.ids for e in backend.encode_batch_fast(sample, add_special_tokens=False)] == \
                self.tokenizer(sample, add_special_tokens=False)["input_ids"]
        if self._backend_matches:
            return [e.ids for e in backend.encode_batch_fast(strings, add_special_tokens=False)]
        return self.tokenizer(strings, add_special_tokens=False)["input_ids"]

    def output_features(self):
        import datasets

        ids = datasets.Sequence(datasets.Value("int64"))
        columns = ("prompt_input_ids", "chosen_labels", "rejected_labels") if self.is_encoder_decoder else \
            ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        return datasets.Features({c: ids for c in columns})

    def _assemble(self, prompt_c: list[int], answer_c: list[int], prompt_r: list[int], answer_r: list[int]) -> Formatted:
        """BOS/EOS, truncation and labels (docs/orpo.md) for one pair's prompt and answer ids."""
        c = self.config
        if abs(len(prompt_c) - len(prompt_r)) > 1 or sum(a != b for a, b in zip(prompt_c, prompt_r)) > 1:
            raise DataError("chosen and rejected tokenize the prompt differently by more than one token")
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is not None:
            prompt_c, prompt_r = ([bos] + p if not p or p[0] != bos else p for p in (prompt_c, prompt_r))
        if eos is not None:
            answer_c, answer_r = (a + [eos] if not a or a[-1] != eos else a for a in (answer_c, answer_r))

        longer = max(len(answer_c), len(answer_r))
        truncated = False
        prompts = []
        for p in (prompt_c, prompt_r):
            if len(p) + longer > c.max_length:
                p = p[: c.max_prompt_length] if c.truncation_mode == "keep_start" else p[-c.max_prompt_length:]
                truncated = True
            prompts.append(p)
        answers = []
        for p, a in zip(prompts, (answer_c, answer_r)):
            if len(p) + longer > c.max_length:
                a = a[: c.max_length - c.max_prompt_length]
                truncated = True
            answers.append(a)

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
        caps = (self.config.max_prompt_length, self.config.max_completion_length or 128, self.config.max_completion_length or 128)
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
        return {"input_ids": pad_right(prompts, self.pad_id), "attention_mask": pad_right([[1] * len(p) for p in prompts], 0),
                "labels": labels, "decoder_input_ids": decoder_input_ids}

    def collate(self, features: list[dict[str, Any]]) -> dict:
        """Chosen rows then rejected rows, right-padded to one length: input_ids, attention_mask, labels
        (and decoder_input_ids, the labels shifted right, for an encoder-decoder)."""
        if self.is_encoder_decoder:
            return self._collate_seq2seq(features)
        rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        length = max(len(r) for r in rows)
        return {
            "input_ids": pad_right(rows, self.pad_id, length),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0, length),
            "labels": pad_right(labels, self.config.label_pad_token_id, length),
        }
