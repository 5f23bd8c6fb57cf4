"""Supervised fine-tuning as an alignkit method: NLL on language-modeling or prompt-completion data.

The data side is the core's SequenceFormatter: each row's columns decide whether it is a language-modeling
(`text` / `messages`) or a prompt-completion row."""

import alignkit
from alignkit.formatters import SequenceFormatter
from alignkit_sft.config import SFTConfig
from alignkit_sft.loss import SFTLoss

__all__ = ["SFTConfig", "SFTLoss"]


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(
        name="sft", config=SFTConfig, formatter=SequenceFormatter, loss=SFTLoss,
        description="Supervised fine-tuning: token-level NLL on text, conversations or prompt-completion pairs.",
        defaults={"train.learning_rate": 2e-5}))
