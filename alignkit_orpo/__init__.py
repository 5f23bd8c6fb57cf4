"""alignkit_orpo: Odds Ratio Preference Optimization as an alignkit method plugin."""

from alignkit import Method, hookimpl
from alignkit.blocks.demo import demo_defaults
from alignkit.formatters import PreferenceDataConfig, PreferenceFormatter
from alignkit_orpo import generation
from alignkit_orpo.config import ORPOMethodConfig
from alignkit_orpo.loss import ORPOLoss, odds_ratio_terms

CITATION = """@article{hong2024orpo,
  title={ORPO: Monolithic Preference Optimization without Reference Model},
  author={Hong, Jiwoo and Lee, Noah and Thorne, James},
  journal={arXiv preprint arXiv:2403.07691},
  year={2024}
}"""

#: the demo's training settings (tiny built-in model on built-in data): it learns to sort in seconds
DEMO_DEFAULTS = demo_defaults(num_train_epochs=2)

METHOD = Method(
    name="orpo",
    config=ORPOMethodConfig,
    formatter=PreferenceFormatter,  # the core's (alignkit.formatters), as DPO, CPO and SimPO use it by name
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
def register_losses(register):
    register("orpo", ORPOLoss)


on_evaluate = generation.on_evaluate  # generate_during_eval, for the ORPO runs that ask for it


#: the TRL-compatible names, from alignkit_orpo.trl, imported on first use (not by plugin discovery)
TRL_NAMES = ("ORPOConfig", "ORPOTrainer", "ScriptArguments", "ModelConfig", "get_peft_config",
             "get_quantization_config",
             "get_kbit_device_map", "SIMPLE_CHAT_TEMPLATE")


def __getattr__(name: str):
    if name in TRL_NAMES:
        from alignkit_orpo import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'alignkit_orpo' has no attribute {name!r}")


__all__ = ["DEMO_DEFAULTS", "ORPOMethodConfig", "PreferenceDataConfig", "PreferenceFormatter", "ORPOLoss",
           "odds_ratio_terms", "METHOD", *TRL_NAMES]
