"""Using a trained model: one-shot generation and an interactive chat, both streaming tokens as they come."""

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from alignkit.blocks.text import is_conversation, prompt_token_ids
from alignkit.cli.images import ImagePrompt
from alignkit.config import ModelConfig, resolve_env
from alignkit.engine.modeling import load_model, load_tokenizer
from alignkit.errors import AlignkitError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float | None = None  # 0: greedy; None: as the model's generation_config says (greedy for a run's)
    top_p: float = 0.95  # when sampling with `temperature`
    seed: int | None = None
    cut_noticed: bool = field(default=False, repr=False)  # the notice that max_new_tokens was cut: once

    def kwargs(self) -> dict:
        if self.temperature is None:
            return {"max_new_tokens": self.max_new_tokens}
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


def load(model_dir: str, dtype: str = "auto"):
    """(model, tokenizer) from a run's output_dir, a PEFT adapter folder, or a hub name; in eval mode.
    Weights load from safetensors only, the adapter's base model included."""
    path = Path(model_dir)
    _refuse_non_generative(path, model_dir)
    if path.is_dir() and (path / "adapter_config.json").exists():
        tokenizer = load_tokenizer(ModelConfig(name_or_path=model_dir))
        model = _load_adapter(path, tokenizer, dtype)
    elif model_dir != "builtin:tiny" and not path.is_dir() and "/" not in model_dir:
        raise ConfigError(f"--model {model_dir}: no such folder (give a run's output_dir or a hub name owner/name)")
    else:
        cfg = ModelConfig(name_or_path=model_dir, dtype=dtype)
        try:
            tokenizer = load_tokenizer(cfg)
            model = load_model(cfg, tokenizer, seed=0)
        except ConfigError as e:  # the loaders name the config key; here the user gave --model
            raise ConfigError(str(e).replace("model.name_or_path:", "--model", 1)) from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ConfigError(f"--model {model_dir}: the model has {rows} token embeddings but its tokenizer has "
                          f"{len(tokenizer)} tokens; model and tokenizer do not belong together")
    return model.eval(), tokenizer


def _refuse_non_generative(path: Path, model_dir: str) -> None:
    """A ConfigError for a folder whose model does not generate text (a sequence classifier, e.g. a reward model), as
    its config.json (or, for a LoRA adapter, adapter_config.json's task type) says."""
    if not path.is_dir():
        return
    what = None
    if (path / "adapter_config.json").is_file():
        task = _adapter_config(path).get("task_type")
        what = f"a LoRA adapter for {task}" if task in ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION") else None
    elif (path / "config.json").is_file():
        try:
            architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return  # the loader reports an unreadable config
        heads = [a for a in architectures if isinstance(a, str) and a.endswith(("ForSequenceClassification",
                                                                                "ForTokenClassification"))]
        what = heads[0] if heads else None
    if what:
        raise ConfigError(f"--model {model_dir}: the model is {what}, which scores text and does not generate it; "
                          "generate and chat need a causal language model (evaluate this one with alignkit eval)")


def _load_adapter(path: Path, tokenizer, dtype: str):
    """A LoRA adapter on its base, both from safetensors (peft's own loader would unpickle a .bin base)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"--model {path}: a LoRA adapter folder needs peft: pip install peft") from None
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(f"--model {path}: no adapter_model.safetensors; alignkit loads safetensors only")
    base = _adapter_config(path).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"--model {path}: adapter_config.json names no base model (base_model_name_or_path)")
    base = resolve_env(base, f"--model {path}: its base model")  # recorded as ${oc.env:...} when given so
    seed = 0
    if base.startswith("builtin:"):  # randomly initialised from the run's seed: read it from its config.yaml
        try:
            seed = yaml.safe_load((path / "config.yaml").read_text())["train"]["seed"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            raise ConfigError(f"--model {path}: an adapter on {base} needs the run's config.yaml "
                              "(train.seed)") from None
    try:
        model = load_model(ModelConfig(name_or_path=base, dtype=dtype), tokenizer, seed=seed)
    except ConfigError as e:
        raise ConfigError(f"--model {path}: its base model: {str(e).removeprefix('model.name_or_path: ')}") from None
    return PeftModel.from_pretrained(model, str(path))


def _adapter_config(path: Path) -> dict:
    """The folder's adapter_config.json as a dict; a one-line ConfigError naming the file otherwise."""
    file = path / "adapter_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {path}: {file}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--model {path}: {file}: must hold a JSON object (PEFT's adapter config), "
                          f"not {type(config).__name__}")
    return config


@dataclass
class Trained:
    """How the model in a folder was trained, as far as its run's config.yaml tells: `prompt_ids(prompt)` builds a
    prompt's ids exactly as the run's formatter did; `on_chat` is whether its data were conversations (None when
    unknown: no config.yaml, or data that cannot be read here)."""

    prompt_ids: Callable[[object], list[int]]
    on_chat: bool | None = None
    data: str | None = None
    bos_first: bool = False  # the formatter puts BOS first (the preference formatters): prompts with images too


def trained(model_dir: str, tokenizer) -> Trained:
    """The `Trained` of a run's output_dir or adapter folder; the tokenizer's own rules for any other model."""
    path = Path(model_dir) / "config.yaml"
    plain = Trained(lambda prompt: prompt_token_ids(tokenizer, prompt))
    if not path.is_file():
        return plain
    from alignkit.api import load_config
    from alignkit.plugins import get_plugin_manager

    try:
        pm = get_plugin_manager()
        cfg, method = load_config(None, str(path), plugins=pm)
        formatter = method.formatter(cfg.method, tokenizer)
    except AlignkitError as e:
        log.warning("%s: cannot tell how the model was trained (%s); prompts follow the tokenizer's own rules", path, e)
        return plain
    return Trained(formatter.prompt_ids, _conversational(cfg.data.train, cfg.data.train_split, pm), cfg.data.train,
                   bool(getattr(formatter, "bos_first", False)))


def _conversational(spec: str | None, split: str, pm) -> bool | None:
    """Whether the first row of a run's training data is a conversation; None for data not at hand (a hub name)."""
    if spec is None or not (spec.startswith("builtin:") or Path(spec).expanduser().exists()):
        return None
    from alignkit.engine.data import load_data
    from alignkit.plugins import registered_datasets

    try:
        row = load_data(spec, split, registered_datasets(pm))[0]
    except (AlignkitError, OSError, ValueError):
        return None
    return any(is_conversation(v) for v in row.values())


@dataclass
class Conversation:
    """Chat history rendered with the tokenizer's chat template, as the run's formatter renders prompts."""

    tokenizer: object
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    render: Callable[[object], list[int]] | None = None  # Trained.prompt_ids; the tokenizer's own rules if None
    images: ImagePrompt | None = None  # --image: in the first user turn, for the whole conversation

    def prompt_ids(self, user: str) -> torch.Tensor:
        return self.inputs(user)[0]

    def inputs(self, user: str) -> tuple[torch.Tensor, dict]:
        """(prompt ids [1, T], image inputs) of the conversation after the user's new turn."""
        if self.tokenizer.chat_template is None:
            raise ConfigError("the model's tokenizer has no chat template; use `alignkit generate --raw` instead")
        self.messages.append({"role": "user", "content": user})
        head = [{"role": "system", "content": self.system}] if self.system else []
        if self.images is not None:
            return self.images.messages(head + self.messages)
        render = self.render or (lambda prompt: prompt_token_ids(self.tokenizer, prompt))
        return torch.tensor([render(head + self.messages)]), {}

    def reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def clear(self) -> None:
        self.messages.clear()


def stream(model, tokenizer, input_ids: torch.Tensor, sampling: Sampling, emit: Callable[[str], None],
           images: dict | None = None) -> str:
    """Generate after input_ids (with the prompt's image inputs), calling emit() with each new piece of text; return
    the whole completion."""
    from transformers import TextStreamer

    class _Emit(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                emit(text)

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    input_ids = input_ids.to(model.device)
    extra = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
             for k, v in (images or {}).items()}
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra,
                             streamer=_Emit(tokenizer, skip_prompt=True, skip_special_tokens=True),
                             pad_token_id=tokenizer.pad_token_id,
                             **{**sampling.kwargs(), "max_new_tokens": _room(model, input_ids.shape[1], sampling)})
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def _room(model, prompt_len: int, sampling: Sampling) -> int:
    """max_new_tokens bounded by the positions the model's context leaves after the prompt (a notice when cut)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int):
        return sampling.max_new_tokens
    room = context - prompt_len
    if room < 1:
        raise ConfigError(f"the prompt has {prompt_len} tokens; the model's context holds {context} "
                          f"(max_position_embeddings): shorten the prompt (in a chat, /clear starts over)")
    if sampling.max_new_tokens > room and not sampling.cut_noticed:
        sampling.cut_noticed = True
        log.warning("note: --max-new-tokens %d cut to %d: the model's context holds %d tokens "
                    "(max_position_embeddings) "
                    "and the prompt takes %d", sampling.max_new_tokens, room, context, prompt_len)
    return min(sampling.max_new_tokens, room)


def generate(model, tokenizer, prompt: str, sampling: Sampling, emit: Callable[[str], None], raw: bool | None = None,
             system: str | None = None, how: Trained | None = None, images: ImagePrompt | None = None) -> str:
    """One completion of `prompt`, its ids built as the model's training built them (`how`): as plain text with
    `raw`, through the chat template without; `raw=None` follows the training data (plain text for a model trained
    on plain text, the chat template otherwise when the tokenizer has one). `images`: --image, with the prompt."""
    how = how or Trained(lambda p: prompt_token_ids(tokenizer, p))
    if raw is None:
        raw = how.on_chat is False
    if raw or tokenizer.chat_template is None:
        ids, extra = images.raw(prompt) if images is not None else (torch.tensor([how.prompt_ids(prompt)]), {})
    else:
        ids, extra = Conversation(tokenizer, system, render=how.prompt_ids, images=images).inputs(prompt)
    return _stream(model, tokenizer, ids, extra, sampling, emit)


def _stream(model, tokenizer, ids: torch.Tensor, images: dict, sampling: Sampling, emit) -> str:
    return stream(model, tokenizer, ids, sampling, emit, **({"images": images} if images else {}))


CHAT_HELP = "/clear starts over, /system TEXT sets the system message, /exit (or Ctrl-D) quits"


def chat(model, tokenizer, lines: Iterable[str], sampling: Sampling, emit: Callable[[str], None],
         system: str | None = None, how: Trained | None = None, images: ImagePrompt | None = None) -> None:
    """The interactive loop over `lines` (the user's turns); `images` (--image) stay in the first user turn."""
    conversation = Conversation(tokenizer, system, render=how.prompt_ids if how else None, images=images)
    if tokenizer.chat_template is None:
        raise ConfigError("the model's tokenizer has no chat template; use `alignkit generate --raw` instead")
    if how is not None and how.on_chat is False:
        log.warning("note: this model was trained on plain text (data.train=%s), not on conversations: its chat "
                    "replies may make no sense; `alignkit generate` completes plain text as it was trained", how.data)
    emit(f"chatting with the model; {CHAT_HELP}\n")
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            conversation.clear()
            emit("(history cleared)\n")
            continue
        if text.startswith("/system"):
            conversation.system = text.removeprefix("/system").strip() or None
            conversation.clear()
            emit(f"(system message {'set' if conversation.system else 'removed'}; history cleared)\n")
            continue
        if text.startswith("/"):
            emit(f"unknown command {text.split()[0]}; {CHAT_HELP}\n")
            continue
        emit("assistant: ")
        conversation.reply(_stream(model, tokenizer, *conversation.inputs(text), sampling, emit))
        emit("\n")
