"""Vision-language models in the loader: which models are ones, their processor, the vision tower frozen and LoRA on
the language model only."""

import json
from pathlib import Path

import torch

from alignkit.builtin import vlm as builtin_vlm
from alignkit.errors import ConfigError

VLM = builtin_vlm.NAME
#: files that hold a processor's settings beside a model (a processor, or an image processor alone)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
#: module names of vision towers across transformers' vision-language models
VISION_TOWERS = ("vision_model", "visual", "vision_tower", "vision_encoder")


def is_vision_model(config: dict | None) -> bool:
    """Whether a model config (as a dict) describes a vision-language model: it has a vision config."""
    return bool(config) and isinstance(config.get("vision_config"), dict)


def local_config(name: str) -> dict | None:
    """The config.json of a local model folder as a dict (None for a hub name or a folder without one)."""
    path = Path(name) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def load_processor(name: str, cfg):
    """The processor of `name` when it is a vision-language model (the built-in one, or a local folder with a saved
    processor or whose config has a vision config), else None. A vision-language model folder without its processor
    is refused."""
    if name == VLM:
        return builtin_vlm.tiny_vlm_processor()
    config = local_config(name)
    saved = any((Path(name) / f).is_file() for f in PROCESSOR_FILES)  # also a LoRA adapter folder of such a model
    if not saved and not is_vision_model(config):
        return None
    if not saved:
        archs = ", ".join(config.get("architectures") or []) or config.get("model_type", "vision-language")
        key = "model.tokenizer_name_or_path" if cfg.tokenizer_name_or_path else "model.name_or_path"
        raise ConfigError(f"{key}: {name} is a vision-language model ({archs}) without its processor (none of "
                          f"{', '.join(PROCESSOR_FILES)}); save the processor there (processor.save_pretrained) or "
                          "point model.tokenizer_name_or_path at a folder that has it")
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.name_or_path: cannot load the processor from {name}: {first}") from None


def with_processor(processor):
    """The processor's tokenizer, carrying the processor as `tokenizer.processor`."""
    tokenizer = processor.tokenizer
    tokenizer.processor = processor
    return tokenizer


def processor_of(tokenizer):
    """The processor a vision-language model's tokenizer carries (None for a text-only model)."""
    return getattr(tokenizer, "processor", None)


def save_processing(tokenizer, folder) -> None:
    """Save the tokenizer, or the processor it carries (which saves the tokenizer too) into `folder`."""
    (processor_of(tokenizer) or tokenizer).save_pretrained(folder)


def _is_vision(name: str) -> bool:
    return any(part in VISION_TOWERS for part in name.split("."))


def freeze_vision_tower(model: torch.nn.Module) -> None:
    """No gradient for the vision tower's parameters (model.freeze_vision_tower, on by default)."""
    for name, param in model.named_parameters():
        if _is_vision(name):
            param.requires_grad_(False)


def language_model_linears(model: torch.nn.Module) -> list[str]:
    """The full names of the linear layers of the language model (not the vision tower, the connector or the LM
    head): LoRA's default targets on a vision-language model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    prefix = next(n for n, m in base.named_modules() if m is decoder)
    return [f"{prefix}.{n}" for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]
