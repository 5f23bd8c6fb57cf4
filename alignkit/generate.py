"""Using a trained model: one-shot generation and an interactive chat, both streaming tokens as they come."""

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from alignkit.config import ModelConfig, resolve_env
from alignkit.errors import ConfigError
from alignkit.modeling import load_model, load_tokenizer


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.95
    seed: int | None = None

    def kwargs(self) -> dict:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


def load(model_dir: str, dtype: str = "auto"):
    """(model, tokenizer) from a run's output_dir, a PEFT adapter folder, or a hub name; in eval mode.
    Weights load from safetensors only, the adapter's base model included."""
    path = Path(model_dir)
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


def _load_adapter(path: Path, tokenizer, dtype: str):
    """A LoRA adapter on its base, both from safetensors (peft's own loader would unpickle a .bin base)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"--model {path}: a LoRA adapter folder needs peft: pip install peft") from None
    if not (path / "adapter_model.safetensors").is_file():
        raise ConfigError(f"--model {path}: no adapter_model.safetensors; alignkit loads safetensors only")
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"--model {path}: adapter_config.json names no base model (base_model_name_or_path)")
    base = resolve_env(base, f"--model {path}: its base model")  # recorded as ${oc.env:...} when given so
    seed = 0
    if base.startswith("builtin:"):  # randomly initialised from the run's seed: read it from its config.yaml
        try:
            seed = yaml.safe_load((path / "config.yaml").read_text())["train"]["seed"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            raise ConfigError(f"--model {path}: an adapter on {base} needs the run's config.yaml (train.seed)") from None
    try:
        model = load_model(ModelConfig(name_or_path=base, dtype=dtype), tokenizer, seed=seed)
    except ConfigError as e:
        raise ConfigError(f"--model {path}: its base model: {str(e).removeprefix('model.name_or_path: ')}") from None
    return PeftModel.from_pretrained(model, str(path))


@dataclass
class Conversation:
    """Chat history rendered with the tokenizer's chat template."""

    tokenizer: object
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def prompt_ids(self, user: str) -> torch.Tensor:
        if self.tokenizer.chat_template is None:
            raise ConfigError("the model's tokenizer has no chat template; use `alignkit generate --raw` instead")
        self.messages.append({"role": "user", "content": user})
        head = [{"role": "system", "content": self.system}] if self.system else []
        ids = self.tokenizer.apply_chat_template(head + self.messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return torch.tensor([ids if isinstance(ids[0], int) else ids[0]])

    def reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def clear(self) -> None:
        self.messages.clear()


def stream(model, tokenizer, input_ids: torch.Tensor, sampling: Sampling, emit: Callable[[str], None]) -> str:
    """Generate after input_ids, calling emit() with each new piece of text; return the whole completion."""
    from transformers import TextStreamer

    class _Emit(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                emit(text)

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    input_ids = input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=_Emit(tokenizer, skip_prompt=True, skip_special_tokens=True),
                             pad_token_id=tokenizer.pad_token_id, **sampling.kwargs())
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def generate(model, tokenizer, prompt: str, sampling: Sampling, emit: Callable[[str], None], raw: bool = False,
             system: str | None = None) -> str:
    """One completion of `prompt`: through the chat template when the tokenizer has one (unless raw)."""
    if raw or tokenizer.chat_template is None:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    else:
        ids = Conversation(tokenizer, system).prompt_ids(prompt)
    return stream(model, tokenizer, ids, sampling, emit)


CHAT_HELP = "/clear starts over, /system TEXT sets the system message, /exit (or Ctrl-D) quits"


def chat(model, tokenizer, lines: Iterable[str], sampling: Sampling, emit: Callable[[str], None],
         system: str | None = None) -> None:
    """The interactive loop over `lines` (the user's turns)."""
    conversation = Conversation(tokenizer, system)
    if tokenizer.chat_template is None:
        raise ConfigError("the model's tokenizer has no chat template; use `alignkit generate --raw` instead")
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
        conversation.reply(stream(model, tokenizer, conversation.prompt_ids(text), sampling, emit))
        emit("\n")
