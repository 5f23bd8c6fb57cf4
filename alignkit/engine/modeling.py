"""Load the model and tokenizer named by the `model` config section (or build the built-in tiny one)."""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
)

from alignkit.blocks.valuehead import VALUE_HEAD, ValueHead
from alignkit.builtin.vlm import tiny_vlm_config, tiny_vlm_processor
from alignkit.config import ModelConfig
from alignkit.engine.data import quiet_hub
from alignkit.engine.envvalues import resolve_env
from alignkit.engine.vision import (
    VLM,
    freeze_vision_tower,
    is_vision_model,
    language_model_linears,
    load_processor,
    local_config,
    with_processor,
)
from alignkit.errors import ConfigError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent.parent / "builtin"
BUILTIN = "builtin:tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """The built-in model's architecture: a 2-layer Llama of about 0.4M parameters."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer; a vision-language model's carries its processor as `tokenizer.processor`
    (alignkit.engine.vision), which the formatters use for rows with images."""
    name = cfg.tokenizer_name_or_path or cfg.name_or_path
    if name == "builtin:tiny":
        return AutoTokenizer.from_pretrained(BUILTIN_DIR / "tokenizer")
    processor = load_processor(name, cfg)
    if processor is not None:
        return with_processor(processor)
    try:
        with quiet_hub():
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except Exception as e:
        raise ConfigError(_load_failure("tokenizer", name, e)) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(f"model.tokenizer_name_or_path: {name} has neither a pad nor an eos token")
        log.warning("tokenizer %s has no pad token; using its eos token %r for padding", name, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class ModelKind:
    """How the core loads, adapts and saves the model of one kind (Method.model_kind)."""

    auto: type  # the transformers class that loads the saved folder
    peft_task: str  # peft's task type: a classifier's head is trained in full and saved with the adapter
    pipeline: str  # the Hugging Face pipeline the model card names
    labels: bool = False  # built with the method's num_labels and the tokenizer's pad token
    value_head: bool = False  # a ValueHead under model.v_head, saved in the same safetensors


KINDS = {
    "causal-lm": ModelKind(AutoModelForCausalLM, "CAUSAL_LM", "text-generation"),
    "sequence-classifier": ModelKind(AutoModelForSequenceClassification, "SEQ_CLS", "text-classification", True),
    "token-classifier": ModelKind(AutoModelForTokenClassification, "TOKEN_CLS", "token-classification", True),
    "causal-lm-value-head": ModelKind(AutoModelForCausalLM, "CAUSAL_LM", "text-generation", value_head=True),
    "image-text-to-text": ModelKind(AutoModelForImageTextToText, "CAUSAL_LM", "image-text-to-text"),
}


def kind_of(model) -> str:
    """The model kind of a loaded `model` (also under a LoRA wrapper): its value head or its class says it."""
    if any(n.rsplit(".", 1)[-1] == VALUE_HEAD for n, _ in model.named_modules()):
        return "causal-lm-value-head"
    names = [type(model).__name__, type(getattr(model, "base_model", model)).__name__,
             *(getattr(getattr(model, "config", None), "architectures", None) or [])]
    if is_vision_model(getattr(getattr(model, "config", None), "to_dict", dict)()):
        return "image-text-to-text"
    for suffix, kind in (("ForSequenceClassification", "sequence-classifier"),
                         ("ForTokenClassification", "token-classifier")):
        if any(isinstance(n, str) and n.endswith(suffix) for n in names):
            return kind
    return "causal-lm"


def load_model(cfg: ModelConfig, tokenizer, seed: int, kind: str = "causal-lm", num_labels: int = 1) -> PreTrainedModel:
    """The policy, in `cfg.dtype`; the built-in model is randomly initialised from `seed`. `kind` is the method's
    model kind (Method.model_kind, the table KINDS): a classifier has `num_labels` outputs and the tokenizer's pad
    token (a sequence classifier scores each row at its last non-pad token, a token classifier every token); a
    causal LM with a value head gets a ValueHead under `model.v_head`, read back from the folder that saved one."""
    if kind == "causal-lm" and (cfg.name_or_path == VLM or is_vision_model(local_config(cfg.name_or_path))):
        kind = "image-text-to-text"  # the model decides: a vision-language model loads as one
    model = _load(cfg, tokenizer, seed, kind, num_labels)
    if kind == "image-text-to-text" and cfg.freeze_vision_tower:
        freeze_vision_tower(model)
    if KINDS[kind].value_head and not hasattr(model, VALUE_HEAD):
        _attach_value_head(model, cfg.name_or_path)
    return model


def _load(cfg: ModelConfig, tokenizer, seed: int, kind: str, num_labels: int) -> PreTrainedModel:
    dtype = DTYPES[cfg.dtype]
    labelled = KINDS[kind].labels
    classifier = {"num_labels": num_labels, "pad_token_id": tokenizer.pad_token_id} if labelled else None
    if (cfg.attn_implementation or "").startswith("flash_attention") and not torch.cuda.is_available():
        raise ConfigError(f"model.attn_implementation={cfg.attn_implementation} needs a CUDA GPU; on this machine use "
                          "sdpa or eager")
    if (Path(cfg.name_or_path) / "adapter_config.json").is_file():
        return _merged_adapter(cfg, tokenizer, seed, kind, num_labels)
    if cfg.name_or_path in (BUILTIN, VLM):
        torch.manual_seed(seed)
        config = (tiny_llama_config(len(tokenizer), **(classifier or {})) if cfg.name_or_path == BUILTIN
                  else tiny_vlm_config(getattr(tokenizer, "processor", None) or tiny_vlm_processor()))
        extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        auto = KINDS[kind].auto
        try:
            model = auto.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype, **extra)
        except (ValueError, ImportError) as e:  # an unknown or uninstalled attention implementation
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model.attn_implementation={cfg.attn_implementation}: {first}") from None
        model.name_or_path = cfg.name_or_path  # what a LoRA adapter records as its base (peft reads this attribute)
        return model
    # Weights load from safetensors only (no pickle) unless init_kwargs says use_safetensors: false.
    kwargs = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, dtype=dtype,
                  **{"use_safetensors": True, **cfg.init_kwargs})
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        with quiet_hub():
            config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                                revision=cfg.revision)
            if classifier:
                _check_labels(cfg.name_or_path, config, num_labels)
                return KINDS[kind].auto.from_pretrained(cfg.name_or_path, **classifier, **kwargs)
            auto = (AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else
                    KINDS[kind].auto if kind == "image-text-to-text" else AutoModelForCausalLM)
            return auto.from_pretrained(cfg.name_or_path, **kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_load_failure("model", cfg.name_or_path, e)) from None


def _check_labels(name_or_path: str, config, num_labels: int) -> None:
    """A classifier checkpoint with another number of labels than the method's model is refused (its head cannot
    load); any other checkpoint (a base or causal LM) gets a fresh head."""
    classifiers = [a for a in getattr(config, "architectures", None) or () if a.endswith("Classification")]
    if classifiers and getattr(config, "num_labels", num_labels) != num_labels:
        raise ConfigError(f"model.name_or_path: {name_or_path} is a {classifiers[0]} with {config.num_labels} labels, "
                          f"and this method's model has {num_labels} (start from a classifier with {num_labels}, or "
                          "from a base or causal language model, which gets a fresh head)")


def check_labels_of(model, kind: str, method_name: str, num_labels: int) -> None:
    """A classifier passed in (not loaded by alignkit) must have the method's number of labels: a reward model needs
    one score per sequence (TRL's RewardTrainer refuses the same model with the same words)."""
    if not KINDS[kind].labels:
        return
    have = getattr(getattr(model, "config", None), "num_labels", None)
    if have != num_labels:
        raise ConfigError(f"The model has `num_labels={have}`, but {method_name} models require "
                          f"`num_labels={num_labels}` ({type(model).__name__}); instantiate it with "
                          f"num_labels={num_labels}, or give its name or path to have it built so")


def _attach_value_head(model: PreTrainedModel, name_or_path: str) -> None:
    """A ValueHead in the model's dtype under model.v_head: the one saved in the folder's safetensors (the keys
    v_head.summary.*, as alignkit and TRL save it), else a fresh one from the current random state."""
    head = ValueHead(model.config.get_text_config().hidden_size).to(model.dtype)
    saved = _saved_tensors(Path(name_or_path), VALUE_HEAD + ".")
    if saved:
        try:
            head.load_state_dict(saved)
        except RuntimeError as e:
            raise ConfigError(f"model.name_or_path: {name_or_path}: its saved value head does not fit the model "
                              f"({str(e).strip().splitlines()[-1].strip()})") from None
    model.add_module(VALUE_HEAD, head)


def _saved_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix` in a local folder's model.safetensors (or its shards), the prefix
    removed; empty for a hub name or a folder without them."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) \
            if index.is_file() else ["model.safetensors"]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"model.name_or_path: {index} is unreadable ({e})") from None
    found = {}
    for name in files:
        if (folder / name).is_file():
            with safe_open(folder / name, framework="pt") as f:
                found.update({k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    return found


def _merged_adapter(cfg: ModelConfig, tokenizer, seed: int, kind: str, num_labels: int) -> PreTrainedModel:
    """A LoRA adapter folder (a run with model.peft) as its base model with the adapter merged in, of the method's
    kind (a classifier's saved head included): `alignkit eval` and further training read it like any model. The
    built-in base is rebuilt from `seed` (the run's train.seed); weights load from safetensors only."""
    import json

    from peft import PeftModel

    path = Path(cfg.name_or_path)
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(f"model.name_or_path: {path} has no adapter_model.safetensors; alignkit loads safetensors "
                          "only")
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.name_or_path: {path}/adapter_config.json names no base model ({e})") from None
    base = resolve_env(base, f"model.name_or_path: {path}: its base model")
    model = load_model(cfg.model_copy(update={"name_or_path": base, "peft": None}), tokenizer, seed, kind, num_labels)
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def _load_failure(what: str, name: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        return f"model.name_or_path: {name} needs custom code; set model.trust_remote_code=true only if you trust it"
    if not Path(name).exists():
        return (f"model.name_or_path: {name}: no such local folder, and the Hugging Face hub did not provide it "
                f"({first})")
    return f"model.name_or_path: cannot load the {what} from {name}: {first}"


def apply_peft(model: PreTrainedModel, settings) -> PreTrainedModel:
    """Wrap `model` with LoRA adapters from `model.peft` settings or a peft config object. A sequence classifier's
    head (`score`, or `classifier`) and a value head are trained in full and saved with the adapter."""
    try:
        import peft
    except ImportError:
        raise ConfigError("model.peft needs the peft package: pip install peft") from None
    if isinstance(settings, peft.PeftConfig):
        config = settings
    else:
        kind = kind_of(model)
        check_peft_targets(model, settings.target_modules, "model.peft.target_modules")
        if kind == "image-text-to-text" and settings.target_modules == "all-linear":  # the language model only
            settings = settings.model_copy(update={"target_modules": language_model_linears(model)})
        check_peft_targets(model, settings.modules_to_save or [], "model.peft.modules_to_save")
        keep = list(settings.modules_to_save or []) + ([VALUE_HEAD] if KINDS[kind].value_head else [])
        config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 target_modules=settings.target_modules, bias=settings.bias,
                                 modules_to_save=list(dict.fromkeys(keep)) or None, task_type=KINDS[kind].peft_task)
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as e:  # peft's own refusals (NoMatchingPeftModuleError is a ValueError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.peft: {first}") from None


def _adaptable(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the modules LoRA can adapt (linear, embedding, convolution), in model order."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    names = {n.rsplit(".", 1)[-1]: None for n, m in model.named_modules()
             if n and (isinstance(m, kinds) or type(m).__name__ == "Conv1D")}
    return list(names)


def check_peft_targets(model: torch.nn.Module, targets: list[str] | str, key: str) -> None:
    """Every name in `targets` must match a module of `model` as peft matches them (the full name or its last
    parts; a single string is a regular expression over full names, or all-linear): peft itself refuses only
    when nothing matches, so a typo beside a valid name would go unnoticed."""
    import re

    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, n) for n in names):
            return
        missing = [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        valid = _adaptable(model)
        shown = ", ".join(valid[:10]) + (", ..." if len(valid) > 10 else "")
        raise ConfigError(f"{key}: {', '.join(map(repr, missing))} names no module of the model; its adaptable "
                          f"modules are {shown}" + (" (or all-linear)" if key.endswith("target_modules") else ""))

