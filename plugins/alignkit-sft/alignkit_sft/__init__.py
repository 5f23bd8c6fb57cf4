"""Supervised fine-tuning as an alignkit method: NLL on language-modeling or prompt-completion data.

The data side is the core's SequenceFormatter (SFTFormatter adds pre-tokenized rows): each row's columns decide
whether it is a language-modeling (`text` / `messages`), a prompt-completion or a pre-tokenized (`input_ids`) row."""

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit_sft.config import SFTConfig
from alignkit_sft.data import DATASETS
from alignkit_sft.formatter import SFTFormatter
from alignkit_sft.loss import SFTLoss

__all__ = ["DEMO_DEFAULTS", "SFTConfig", "SFTLoss"]

#: the demo's training settings (tiny built-in model on builtin:sort-sft): it learns to sort in seconds
DEMO_DEFAULTS = demo_defaults(num_train_epochs=2)


@alignkit.hookimpl
def register_methods(register):
    register(alignkit.Method(
        name="sft", config=SFTConfig, formatter=SFTFormatter, loss=SFTLoss,
        description="Supervised fine-tuning: token-level NLL on text, conversations or prompt-completion pairs.",
        defaults={"train.learning_rate": 2e-5}, demo_data="sort-sft", demo_defaults=DEMO_DEFAULTS,
        progress_metrics=("mean_token_accuracy",)))


@alignkit.hookimpl
def register_datasets(register):
    for name, loader in DATASETS.items():
        register(name, loader)
