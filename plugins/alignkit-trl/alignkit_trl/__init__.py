"""alignkit_trl: TRL's names on alignkit. `from trl import X` becomes `from alignkit_trl import X`.

Every name is imported on first use (module __getattr__) from where it lives: a trainer and its config from its
method's plugin, the script helpers from alignkit_trl.scripts. Importing alignkit_trl imports nothing else."""

import importlib

#: name -> the module that defines it
LOCATIONS = {
    **dict.fromkeys(("SFTConfig", "SFTTrainer"), "alignkit_sft.trl"),
    **dict.fromkeys(("DPOConfig", "DPOTrainer"), "alignkit_dpo.trl"),
    **dict.fromkeys(("KTOConfig", "KTOTrainer"), "alignkit_kto.trl"),
    **dict.fromkeys(("GRPOConfig", "GRPOTrainer"), "alignkit_grpo.trl"),
    **dict.fromkeys(("RLOOConfig", "RLOOTrainer"), "alignkit_rloo.trl"),
    **dict.fromkeys(("RewardConfig", "RewardTrainer"), "alignkit_reward.trl"),
    **dict.fromkeys(("GKDConfig", "GKDTrainer"), "alignkit_distill.trl"),
    **dict.fromkeys(("ORPOConfig", "ORPOTrainer"), "alignkit_orpo"),
    **dict.fromkeys(("ScriptArguments", "ModelConfig", "DatasetConfig", "DatasetMixtureConfig", "TrlParser",
                     "get_dataset", "get_peft_config", "get_quantization_config", "get_kbit_device_map"),
                    "alignkit_trl.scripts"),
}

__all__ = sorted(LOCATIONS)


def __getattr__(name: str):
    where = LOCATIONS.get(name)
    if where is None:
        raise AttributeError(f"module 'alignkit_trl' has no attribute {name!r} (alignkit offers: "
                             f"{', '.join(__all__)})")
    try:
        module = importlib.import_module(where)
    except ModuleNotFoundError as e:
        plugin = where.split(".")[0].replace("_", "-")
        raise ImportError(f"alignkit_trl.{name} needs the {plugin} plugin ({e.name} is not installed): "
                          f"pip install {plugin}") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
