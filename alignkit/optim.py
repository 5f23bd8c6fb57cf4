"""The optimizer and learning-rate schedule a run builds when none is passed in."""

import math

import torch
from transformers import get_scheduler

from alignkit.config import TrainConfig


def adamw(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D parameters) get no weight decay,
    as in transformers."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def max_steps(t: TrainConfig, batches_per_epoch: int) -> int:
    """train.max_steps, or the optimizer steps of train.num_train_epochs epochs."""
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    return t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)


def schedule(t: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    """transformers' schedule train.lr_scheduler_type over `steps`, with the configured warmup."""
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * steps)
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                         scheduler_specific_kwargs=t.lr_scheduler_kwargs)
