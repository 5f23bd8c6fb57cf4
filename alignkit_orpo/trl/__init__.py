"""The TRL v0.15.2 surface: `from alignkit_orpo import ORPOConfig, ORPOTrainer` (and what TRL's ORPO example
script imports) runs a TRL ORPO script on alignkit. Loaded on first use only: plugin discovery never
imports it (see alignkit_orpo.__getattr__)."""

from alignkit_orpo.trl.args import ORPOConfig
from alignkit_orpo.trl.scripts import (
    SIMPLE_CHAT_TEMPLATE,
    ModelConfig,
    ScriptArguments,
    get_kbit_device_map,
    get_peft_config,
    get_quantization_config,
)
from alignkit_orpo.trl.trainer import ORPOTrainer

__all__ = ["ORPOConfig", "ORPOTrainer", "ScriptArguments", "ModelConfig", "get_peft_config",
           "get_quantization_config", "get_kbit_device_map", "SIMPLE_CHAT_TEMPLATE"]
