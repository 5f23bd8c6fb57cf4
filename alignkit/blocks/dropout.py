"""Dropout control: a loss that compares two forward passes of one model (policy vs reference) turns dropout
off so both see the same network."""

import torch


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p=0 on every torch.nn.Dropout module of `model`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
