"""Checks that need more than the config (the device, the loaded model, a collated batch), made before any
training work: each mistake is one ConfigError naming the key to change."""

import torch

from alignkit.errors import ConfigError


def check_settings(config, method, eval_given: bool = False) -> None:
    """Before anything is loaded or written: the settings against each other and the method's own
    `validate(config)`. `eval_given`: an eval dataset was passed in (not named by the config)."""
    t = config.train
    d = config.data
    if not (eval_given or d.eval is not None or d.eval_fraction is not None):
        asked = [key for key, on in (("train.eval_steps", t.eval_steps), ("train.eval_on_start", t.eval_on_start))
                 if on]
        if asked:
            raise ConfigError(f"{' and '.join(asked)} ask for evaluation, but the run has no eval data: give data.eval="
                              "FILE or data.eval_fraction=0.1, or remove " + " and ".join(asked))
    validate_method(config, method)
    if t.fp16 and (t.use_cpu or not torch.accelerator.is_available()):
        raise ConfigError("train.fp16: float16 mixed precision needs a GPU and this run is on the CPU; use "
                          "train.bf16=true or neither")
    loss = method.loss if isinstance(method.loss, type) else type(method.loss)
    if config.model.ref_name_or_path and not getattr(loss, "needs_reference_model", False):
        raise ConfigError(f"model.ref_name_or_path: method {method.name} uses no reference model; remove the key")
    if config.model.ref_offload and not getattr(loss, "needs_reference_model", False):
        raise ConfigError(f"model.ref_offload: method {method.name} uses no reference model; remove the key")
    if config.model.ref_offload and config.model.peft is not None and not config.model.ref_name_or_path:
        raise ConfigError("model.ref_offload: with model.peft and no model.ref_name_or_path the reference is the "
                          "policy itself with its adapters off (no second copy to offload); remove the key")
    if method.rollout is None and config.generation.backend != "transformers":
        raise ConfigError(f"generation.backend={config.generation.backend}: method {method.name} samples nothing (it "
                          "has no rollout); remove the key")


def validate_method(config, method) -> None:
    """The method's own `validate(config)`: its ConfigError (or ValueError, prefixed with the method) is one line."""
    if method.validate is None:
        return
    try:
        method.validate(config)
    except ConfigError:
        raise
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise ConfigError(f"method {method.name}: {first}") from None


def check_model(config, model, tokenizer) -> None:
    """After loading (and LoRA): weights finite, vocabulary as large as the tokenizer's."""
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if named:
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()  # one device sync
        if not all(finite):
            name = named[finite.index(False)][0]
            raise ConfigError(f"model.name_or_path: {config.model.name_or_path}: parameter {name} holds NaN/inf "
                              "values; the input model is damaged (train from a checkpoint with finite weights)")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and rows < len(tokenizer):
        raise ConfigError(f"model.name_or_path: {config.model.name_or_path} has {rows} token embeddings but its "
                          "tokenizer "
                          f"has {len(tokenizer)} tokens; ids >= {rows} would crash: use the model's own tokenizer "
                          "(model.tokenizer_name_or_path)")


def check_trainable(model, optim: str) -> None:
    """Before training with an Adam-family train.optim: it cannot update float16 weights."""
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half and "adam" in optim:
        raise ConfigError(f"model.dtype: {half[0]} and {len(half) - 1} other trained weights are float16, which "
                          f"train.optim={optim} cannot update (Adam's epsilon 1e-08 rounds to 0 in float16: the steps "
                          "divide by zero); load float32 weights (with train.fp16=true on a GPU for speed) or "
                          "model.dtype=bfloat16")


def check_ids(collate, ds, model, method_config) -> None:
    """Collate the first rows and check that every token id fed to the model is in its vocabulary (padding
    included: a pad id outside it would crash, or silently read another row of the embedding matrix)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None or len(ds) == 0:
        return
    batch = collate([ds[i] for i in range(min(8, len(ds)))])
    for key, value in batch.items():
        if not (key.endswith("input_ids") and isinstance(value, torch.Tensor)) or value.numel() == 0:
            continue
        low, high = int(value.min()), int(value.max())
        bad = high if high >= vocab else low if low < 0 else None
        if bad is None:
            continue
        keys = [f"method.{k}" for k, v in method_config if isinstance(v, int) and not isinstance(v, bool) and v == bad]
        hint = f"{' or '.join(keys)} is {bad}" if keys else "the tokenizer does not match the model"
        raise ConfigError(f"{hint}: token id {bad} in {key} is outside the model's vocabulary (0..{vocab - 1})")


def check_update(model, accelerator, step: int, loss: float, grad_norm: float) -> None:
    """The weights after a step must be finite too (a finite loss and gradient can still give NaN/inf weights:
    an infinite learning rate, an optimizer in too low a precision). One reduction, one device sync."""
    import math

    from alignkit.errors import NonFiniteError

    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return
    total = torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for _, p in named]).sum()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    if math.isfinite(total.item()):
        return
    bad = next((n for n, p in named if not torch.isfinite(p.detach()).all()), "a parameter on another process")
    raise NonFiniteError(f"step {step}: the update made {bad} NaN/inf although the loss ({loss:.6g}) and gradient norm "
                         f"({grad_norm:.6g}) were finite; nothing more is saved, the last checkpoint stays valid. "
                         "Lower train.learning_rate, or train float32 weights")
