"""alignkit_orpo: Odds Ratio Preference Optimization as an alignkit method plugin."""

from alignkit import Method, hookimpl
from alignkit_orpo import generation
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

METHOD = Method(
    name="orpo",
    config=ORPOMethodConfig,
    formatter=PreferenceFormatter,
    loss=ORPOLoss,
    description="Odds Ratio Preference Optimization: SFT plus an odds-ratio penalty, no reference model.",
    defaults={"train.learning_rate": 1e-6},
    citation=CITATION,
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


on_evaluate = generation.on_evaluate  # generate_during_eval, for the runs that ask for it


__all__ = ["ORPOConfig", "ORPOTrainer", "ORPOMethodConfig", "PreferenceDataConfig", "PreferenceFormatter", "ORPOLoss", "odds_ratio_terms", "METHOD"]
