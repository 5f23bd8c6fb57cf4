"""The value head a "causal-lm-value-head" method trains beside the language model: one scalar per token."""

import torch
from torch import nn

#: the attribute the head lives under on the model, and the prefix of its weights in the saved model.safetensors
#: (the layout TRL's AutoModelForCausalLMWithValueHead reads: v_head.summary.weight / .bias)
VALUE_HEAD = "v_head"


class ValueHead(nn.Module):
    """hidden states [..., H] -> values [...], in float32 whatever the model's dtype."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def value_head(model: nn.Module) -> nn.Module:
    """The value head of `model` (also under a LoRA or distributed wrapper; with LoRA it is trained in full and
    saved with the adapter). Call it on final hidden states (alignkit.blocks.lmhead.final_hidden_states)."""
    for name, module in model.named_modules():  # the first is the wrapper LoRA puts around it, if any
        if name.rsplit(".", 1)[-1] == VALUE_HEAD:
            return module
    raise ValueError("the model has no value head: the method declares model_kind='causal-lm-value-head'")
