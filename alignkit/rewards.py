"""Reward functions for online methods: found by name among the plugins, scored with checks.

A plugin registers rewards with the `register_rewards(register)` hook: `register(name, fn)`, where
`fn(prompts, completions, **row_columns) -> list[float | None]` gets the prompts and completions as text
(one entry per completion, each prompt repeated for its samples) and every other column of the prompt
rows (e.g. `answer=[...]`), and returns one reward per completion (None: not applicable to that one).
A config selects rewards by name; `model:PATH` uses a sequence-classification checkpoint as a reward.
"""

import math
from collections.abc import Callable, Sequence

import torch

from alignkit.errors import ConfigError, PluginError, did_you_mean

RewardFn = Callable[..., list]
MODEL_PREFIX = "model:"


class RewardRegistry:
    """Reward functions by name, and which plugin distribution registered each."""

    def __init__(self) -> None:
        self.functions: dict[str, tuple[RewardFn, str]] = {}

    @classmethod
    def from_plugins(cls, pm) -> "RewardRegistry":
        registry = cls()
        for impl in pm.hook.register_rewards.get_hookimpls():
            source = getattr(pm, "sources", {}).get(impl.plugin_name, (impl.plugin_name, ""))[0]
            impl.function(register=lambda name, fn, s=source: registry.add(name, fn, s))
        return registry

    def add(self, name: str, fn: RewardFn, source: str = "") -> None:
        if not callable(fn):
            raise PluginError(f"plugin {source} registered reward {name!r} as {type(fn).__name__}, not a function")
        if name in self.functions:
            raise PluginError(f"reward {name!r} is registered twice: by {self.functions[name][1]} and by {source}")
        if name.startswith(MODEL_PREFIX):
            raise PluginError(f"plugin {source}: reward names may not start with {MODEL_PREFIX!r} ({name!r})")
        self.functions[name] = (fn, source)

    def select(self, names: Sequence[str], key: str = "method.reward_funcs") -> list[tuple[str, RewardFn]]:
        """(name, function) for each configured name; `model:PATH` loads that reward model."""
        out = []
        for name in names:
            if name.startswith(MODEL_PREFIX):
                out.append((name, RewardModel(name.removeprefix(MODEL_PREFIX))))
            elif name in self.functions:
                out.append((name, self.functions[name][0]))
            else:
                known = ", ".join(sorted(self.functions)) or "none"
                raise ConfigError(f"{key}: no reward function {name!r}{did_you_mean(name, self.functions)}; "
                                  f"registered: {known}, or model:PATH for a reward model")
        return out


def score(functions: list[tuple[str, RewardFn]], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> torch.Tensor:
    """Rewards [completions, functions] (float32, NaN where a function returned None).

    A function that returns the wrong number of rewards, or a NaN/inf reward, is an error naming it and the row."""
    out = torch.full((len(completions), len(functions)), float("nan"))
    for j, (name, fn) in enumerate(functions):
        values = fn(prompts=prompts, completions=completions, **columns)
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if len(values) != len(completions):
            raise PluginError(f"reward {name!r} returned {len(values)} rewards for {len(completions)} completions; "
                              "return one per completion (None where it does not apply)")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise PluginError(f"reward {name!r} returned {v!r} for row {i} (prompt {prompts[i]!r}); "
                                  "rewards are numbers or None") from None
            if not math.isfinite(v):
                raise PluginError(f"reward {name!r} returned {v} for row {i} (prompt {prompts[i]!r}, completion "
                                  f"{completions[i]!r}); rewards must be finite (None where it does not apply)")
            out[i, j] = v
    return out


class RewardModel:
    """A sequence-classification checkpoint as a reward: the first logit of prompt + completion."""

    def __init__(self, path: str, batch_size: int = 32) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"method.reward_funcs: model:{path} is not a loadable sequence-classification "
                              f"checkpoint ({first})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def _text(self, prompt, completion) -> str:
        """prompt + completion as the reward model reads it: a conversation (a list of messages) with the completion
        as the assistant's turn is rendered with the reward model's chat template, as TRL does."""
        if isinstance(prompt, str):
            return prompt + (completion if isinstance(completion, str) else completion[-1]["content"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"method.reward_funcs: the reward model's tokenizer ({self.tokenizer.name_or_path}) has "
                              "no chat template, so it cannot read conversational prompts")
        turn = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(list(prompt) + turn, tokenize=False)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     padding_side="right", add_special_tokens=False).to(device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out
