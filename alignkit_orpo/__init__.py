"""alignkit_orpo: Odds Ratio Preference Optimization as an alignkit method plugin."""

from alignkit import Method, hookimpl
from alignkit_orpo import demo, generation
from alignkit_orpo.config import ORPOMethodConfig, PreferenceDataConfig
from alignkit_orpo.formatter import PreferenceFormatter
from alignkit_orpo.loss import ORPOLoss, odds_ratio_terms
from alignkit_orpo.trainer import ORPOTrainer
from alignkit_orpo.trl_config import ORPOConfig

CITATION = """@article{hong2024orpo,
  title={ORPO: Monolithic Preference Optimization without Reference Model},
  author={Hong, Jiwoo and Lee, Noah and Thorne, James},
  journal={arXiv preprint arXiv:2403.07691},
  year={2024}
}"""

#: the demo's training settings (tiny built-in model on built-in data): it learns to sort in seconds
DEMO_DEFAULTS = {
    "train.learning_rate": 3e-3, "train.num_train_epochs": 2, "train.per_device_train_batch_size": 16,
    "train.per_device_eval_batch_size": 50, "train.warmup_ratio": 0.05, "train.logging_steps": 10,
    "train.eval_steps": 50, "train.save_steps": 100, "train.save_total_limit": 2, "train.eval_on_start": True,
}

METHOD = Method(
    name="orpo",
    config=ORPOMethodConfig,
    formatter=PreferenceFormatter,
    loss=ORPOLoss,
    description="Odds Ratio Preference Optimization: SFT plus an odds-ratio penalty, no reference model.",
    defaults={"train.learning_rate": 1e-6},
    citation=CITATION,
    demo_data="sort",
    demo_defaults=DEMO_DEFAULTS,
    progress_metrics=("rewards/accuracies",),
)


@hookimpl
def register_methods(register):
    register(METHOD)


@hookimpl
def register_formatters(register):
    register("preference", PreferenceFormatter)


@hookimpl
def register_losses(register):
    register("orpo", ORPOLoss)


@hookimpl
def register_datasets(register):
    demo.register(register)  # builtin:sort and builtin:sort-chat


on_evaluate = generation.on_evaluate  # generate_during_eval, for the ORPO runs that ask for it


__all__ = ["DEMO_DEFAULTS", "ORPOConfig", "ORPOTrainer", "ORPOMethodConfig", "PreferenceDataConfig", "PreferenceFormatter", "ORPOLoss", "odds_ratio_terms", "METHOD"]
