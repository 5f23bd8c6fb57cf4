"""Supervised fine-tuning as an alignkit method: NLL on language-modeling or prompt-completion data."""

import alignkit
from alignkit_sft.config import SFTConfig, SFTDataConfig
from alignkit_sft.formatter import SFTFormatter
from alignkit_sft.loss import SFTLoss

__all__ = ["SFTConfig", "SFTDataConfig", "SFTFormatter", "SFTLoss"]


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(
        name="sft", config=SFTConfig, formatter=SFTFormatter, loss=SFTLoss,
        description="Supervised fine-tuning: token-level NLL on text, conversations or prompt-completion pairs.",
        defaults={"train.learning_rate": 2e-5}))
