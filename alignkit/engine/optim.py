"""The optimizer and learning-rate schedule a run builds when none is passed in.

`train.optim` names any optimizer transformers' Trainer knows (adamw_torch, sgd, rmsprop, adafactor,
adamw_bnb_8bit, ...), built through transformers' own optimizer factory, so each name means what it
means to a Trainer user. Biases and norm weights (1-D parameters) get no weight decay. An optimizer
whose package is missing is refused with the package to install.
"""

import math
from types import SimpleNamespace

import torch
from transformers import get_scheduler

from alignkit.config import TrainConfig
from alignkit.errors import ConfigError, did_you_mean


def optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return sorted(o.value for o in OptimizerNames)


def optimizer_class_and_kwargs(train: TrainConfig, model=None) -> tuple[type, dict]:
    """transformers' (optimizer class or factory, keyword arguments) for `train.optim` and `train.optim_args`."""
    from transformers import Trainer

    names = optimizer_names()
    if train.optim not in names:
        raise ConfigError(f"train.optim: unknown optimizer {train.optim!r}{did_you_mean(train.optim, names)}; "
                          f"choose from {', '.join(names)}")
    # The factory reads these fields of TrainingArguments; a namespace avoids building one (device set-up).
    args = SimpleNamespace(
        optim=train.optim, optim_args=train.optim_args, learning_rate=train.learning_rate,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_epsilon=train.adam_epsilon,
        weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, optim_target_modules=None,
        gradient_accumulation_steps=train.gradient_accumulation_steps, parallel_mode=None)
    try:
        return Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ModuleNotFoundError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.optim={train.optim} cannot run here: {first}") from None


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `train.optim` names over the trainable parameters of `model`."""
    from transformers.trainer_optimizer import is_optimizer_factory

    cls, kwargs = optimizer_class_and_kwargs(train, model)
    if is_optimizer_factory(cls):
        return cls()(model, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    for key in ("params", "model", "optimizer_dict"):  # factories that choose the parameters themselves
        if key in kwargs:
            groups = kwargs.pop(key)
    return cls(groups, **kwargs)


def max_steps(t: TrainConfig, batches_per_epoch: int, passes: int = 1) -> int:
    """train.max_steps, or the optimizer steps of train.num_train_epochs epochs (`passes` optimizer steps per
    window of micro-batches: an online method's optimisation passes per rollout)."""
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps) * passes
    return t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)


def schedule(t: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    """transformers' schedule train.lr_scheduler_type over `steps`, with the configured warmup."""
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * steps)
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                         scheduler_specific_kwargs=t.lr_scheduler_kwargs)
