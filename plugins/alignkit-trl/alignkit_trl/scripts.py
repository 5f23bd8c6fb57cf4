"""What TRL 1.16's example scripts import besides the trainers: ScriptArguments, ModelConfig, DatasetConfig /
DatasetMixtureConfig with get_dataset, TrlParser (--config YAML), get_peft_config, get_quantization_config and
get_kbit_device_map, with TRL 1.16's field names and defaults. get_dataset also reads alignkit's built-in data:
a dataset `path: builtin:NAME` (e.g. builtin:sort-sft) loads that split offline."""

import argparse
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from transformers import HfArgumentParser

BUILTIN = "builtin:"


@dataclass
class ScriptArguments:
    """The dataset arguments of TRL's scripts."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name (hub id or local folder)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (`name`)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset."})
    ignore_bias_buffers: bool = field(default=False, metadata={"help": "DDP work-around for boolean buffers."})


@dataclass
class ModelConfig:
    """The model arguments of TRL's scripts: loading, LoRA and k-bit quantization."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model to start from (builtin:tiny "
                                                                           "is alignkit's offline tiny model)."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    dtype: str | None = field(default="float32", metadata={"help": "Dtype to load the weights in.",
                                                            "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt."})
    lora_target_parameters: list[str] | None = field(default=None, metadata={"help": "Parameters to adapt."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "peft task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits (LoRA only)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (LoRA only)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type.",
                                                              "choices": ["fp4", "nf4"]})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested 4-bit quantization."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "Storage dtype of 4-bit weights."})

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("ModelConfig: set load_in_8bit or load_in_4bit, not both")
        if isinstance(self.lora_target_modules, list) and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]  # one name: peft matches it as a pattern


@dataclass
class DatasetConfig:
    """One dataset of a mixture: load_dataset's arguments (path may be builtin:NAME)."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None


@dataclass
class DatasetMixtureConfig:
    """Datasets concatenated into one (the `datasets:` section of a --config YAML file)."""

    datasets: list[DatasetConfig] = field(default_factory=list, metadata={"help": "The datasets of the mixture."})
    streaming: bool = field(default=False, metadata={"help": "Stream the datasets."})
    test_split_size: float | None = field(default=None, metadata={"help": "Test fraction split off the mixture."})

    def __post_init__(self) -> None:
        self.datasets = [DatasetConfig(**d) if isinstance(d, dict) else d for d in self.datasets]


def _builtin(name: str, split: str):
    """alignkit's built-in dataset `name` (registered by a plugin's register_datasets hook), split train or test."""
    from alignkit import get_plugin_manager

    found: dict = {}
    pm = get_plugin_manager()
    for impl in pm.hook.register_datasets.get_hookimpls():
        impl.function(register=lambda n, loader: found.setdefault(n, loader))
    if name not in found:
        raise ValueError(f"get_dataset: no built-in dataset {BUILTIN}{name}; installed: "
                         f"{', '.join(BUILTIN + n for n in sorted(found)) or 'none'}")
    return found[name](split)


def get_dataset(mixture_config: DatasetMixtureConfig):
    """The mixture's datasets, concatenated (each cut to its `fraction` share, never oversampled), as a
    DatasetDict with a train split (and a test split when test_split_size is set)."""
    import datasets

    parts = []
    for d in mixture_config.datasets:
        if d.path.startswith(BUILTIN):
            ds = _builtin(d.path.removeprefix(BUILTIN), d.split)
        else:
            ds = datasets.load_dataset(path=d.path, name=d.name, data_dir=d.data_dir, data_files=d.data_files,
                                       split=d.split, streaming=mixture_config.streaming)
        parts.append(ds.select_columns(d.columns) if d.columns is not None else ds)
    if not parts:
        raise ValueError("get_dataset: the mixture lists no datasets")
    fractions = [d.fraction for d in mixture_config.datasets]
    if any(f is not None for f in fractions):
        if None in fractions:
            raise ValueError("get_dataset: set `fraction` for every dataset of the mixture or for none")
        weights = [f / sum(fractions) for f in fractions]
        total = min(len(ds) / w for ds, w in zip(parts, weights) if w > 0)
        parts = [ds.select(range(round(w * total))) for ds, w in zip(parts, weights)]
    combined = datasets.concatenate_datasets(parts)
    if mixture_config.test_split_size is not None:
        return combined.train_test_split(test_size=mixture_config.test_split_size)
    return datasets.DatasetDict({"train": combined})


class TrlParser(HfArgumentParser):
    """HfArgumentParser that also reads `--config FILE.yaml`: its values replace the defaults (the command line
    still wins) and its `env:` mapping is set in os.environ."""

    def __init__(self, dataclass_types=None, **kwargs) -> None:
        types = [] if dataclass_types is None else (
            list(dataclass_types) if isinstance(dataclass_types, Iterable) else [dataclass_types])
        for t in types:
            if "config" in t.__dataclass_fields__:
                raise ValueError(f"{t.__name__} has a field named 'config', reserved for the --config file path")
        super().__init__(dataclass_types=types, **kwargs)

    def parse_args_and_config(self, args: Iterable[str] | None = None, return_remaining_strings: bool = False,
                              fail_with_unknown_args: bool = True, separate_remaining_strings: bool = False):
        import yaml

        args = list(args) if args is not None else sys.argv[1:]
        from_file: list[str] = []
        if "--config" in args:
            i = args.index("--config")
            args.pop(i)
            path = args.pop(i)
            with open(path) as f:
                config = yaml.safe_load(f)
            if not isinstance(config, dict):
                raise ValueError(f"Config file {path} must contain a YAML mapping.")
            env = config.pop("env", {})
            if not isinstance(env, dict):
                raise ValueError("`env` field should be a dict in the YAML file.")
            os.environ.update({k: str(v) for k, v in env.items()})
            from_file = self.set_defaults_with_config(**config)
        out = self.parse_args_into_dataclasses(args=args, return_remaining_strings=return_remaining_strings)
        if return_remaining_strings:
            if separate_remaining_strings:
                return out[:-1] + (from_file, out[-1])
            return out[:-1] + (from_file + out[-1],)
        if fail_with_unknown_args and from_file:
            raise ValueError(f"Unknown arguments from config file: {from_file}. Please remove them, add them to the "
                             "dataclass, or set `fail_with_unknown_args=False`.")
        return out

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """Make each given value the default of its argument (no longer required); the rest come back as flags."""
        used: set[str] = set()

        def apply(parser) -> None:
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for sub in action.choices.values():
                        apply(sub)
                elif action.dest in kwargs:
                    action.default, action.required = kwargs[action.dest], False
                    used.add(action.dest)

        apply(self)
        return [item for k, v in kwargs.items() if k not in used for item in (f"--{k}", str(v))]


def get_peft_config(model_args: ModelConfig):
    """A peft LoraConfig from the LoRA fields (None without use_peft)."""
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("ModelConfig.use_peft needs the peft package: pip install peft") from None
    return LoraConfig(task_type=model_args.lora_task_type, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                      lora_dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
                      target_parameters=model_args.lora_target_parameters, bias="none",
                      use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
                      modules_to_save=model_args.lora_modules_to_save)


def get_quantization_config(model_args: ModelConfig):
    """A transformers BitsAndBytesConfig for load_in_4bit / load_in_8bit (None otherwise)."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=model_args.dtype,
                              bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
                              bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage or model_args.dtype)


def get_kbit_device_map() -> dict[str, int | str] | None:
    """Each process's accelerator for k-bit loading; None on a machine without one."""
    import torch
    from accelerate import PartialState

    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return {"": f"xpu:{PartialState().local_process_index}"}
    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return None
