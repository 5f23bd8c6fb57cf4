"""Helpers for tests, including plugin authors' tests: a tiny model and tokenizer, a tiny vision-language model and
its processor, a fixed-logits stand-in model, a fresh plugin manager."""

from collections.abc import Iterable
from types import SimpleNamespace

import torch

from alignkit.engine.modeling import BUILTIN_DIR, tiny_llama_config
from alignkit.plugins import PluginManager, get_plugin_manager


def tiny_tokenizer():
    """The built-in byte-level BPE tokenizer (384 tokens, BOS/EOS/PAD, a chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUILTIN_DIR / "tokenizer")


def tiny_model(seed: int = 0, **config_overrides):
    """A randomly initialised tiny Llama matching `tiny_tokenizer()`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(len(tiny_tokenizer()), **config_overrides))


def tiny_vlm_processor():
    """The built-in vision-language model's processor (`builtin:tiny-vlm`): the built-in tokenizer plus the image
    tokens, 32x32 images of 4 image tokens each."""
    from alignkit.builtin.vlm import tiny_vlm_processor as build

    return build()


def tiny_vlm(seed: int = 0, processor=None):
    """A randomly initialised `builtin:tiny-vlm` (an Idefics3 architecture) matching `tiny_vlm_processor()`."""
    from transformers import AutoModelForImageTextToText

    from alignkit.builtin.vlm import tiny_vlm_config

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(tiny_vlm_config(processor or tiny_vlm_processor()))


def plugin_manager(*plugins: object, entry_points: bool = False, also: Iterable[object] = ()) -> PluginManager:
    """A fresh manager with exactly `plugins` registered in-process (installed entry points only on request)."""
    return get_plugin_manager(list(plugins) + list(also), load_entrypoints=entry_points)


class FixedLogits(torch.nn.Module):
    """Stands in for a causal LM in loss tests: returns the given logits `[B, T, V]` whatever the input, so a test
    can compute the expected loss from the same numbers by hand (e.g. in float64). The logits are a parameter:
    gradients can be checked too."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids=None, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.logits)
