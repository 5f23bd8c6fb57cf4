"""TrainingArgumentsBridge: transformers.TrainingArguments with TRL 1.x's common overrides (TRL's base config:
logging_steps 10, gradient checkpointing on, bf16 unless fp16), mapped to alignkit keys.

A plugin's TRL-style config is a dataclass subclass adding the method's fields with TRL's defaults and naming its
alignkit method config (`method_config`). `to_alignkit()` turns the instance into alignkit overrides: a
TrainingArguments field is mapped to a `train.` / `model.` key, carried out by the trainer itself (logging,
evaluation and save strategies, best model, hub), ignored with a warning where ignoring it cannot change the trained
weights, or refused with the reason; a method field goes to the `method.` key of the same name (or the plugin's
`method_keys`), or is refused with the plugin's reason (`unsupported`).
"""

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments


def _report_to(value) -> dict[str, Any]:
    names = [value] if isinstance(value, str) else list(value or [])
    return {"train.report_to": [n for n in names if n not in ("none", "all")]}


def _model_init_kwargs(value) -> dict[str, Any]:
    """TRL's model_init_kwargs: the keys alignkit's `model` section has go there, the rest to model.init_kwargs."""
    own = {"revision": "model.revision", "dtype": "model.dtype", "torch_dtype": "model.dtype",
           "attn_implementation": "model.attn_implementation", "trust_remote_code": "model.trust_remote_code"}
    out, rest = {}, {}
    for key, x in (value or {}).items():
        if x is None:
            continue
        if key in own:
            out[own[key]] = str(x).removeprefix("torch.") if key in ("dtype", "torch_dtype") else x
        else:
            rest[key] = x
    return {**out, "model.init_kwargs": rest}


def _sampling(value) -> dict[str, Any]:
    return {"train.group_by_length": value == "group_by_length", "train.shuffle": value != "sequential"}


#: TrainingArguments field -> alignkit key (or a function of the value giving overrides); always passed
TRAIN: dict[str, Any] = {
    "output_dir": lambda v: {"train.output_dir": v or "trainer_output"},
    "learning_rate": "train.learning_rate", "weight_decay": "train.weight_decay", "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2", "adam_epsilon": "train.adam_epsilon", "max_grad_norm": "train.max_grad_norm",
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "per_device_eval_batch_size": "train.per_device_eval_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps", "lr_scheduler_type": lambda v: {"train.lr_scheduler_type": getattr(v, "value", v)},
    "lr_scheduler_kwargs": lambda v: {"train.lr_scheduler_kwargs": v or {}},
    "warmup_steps": lambda v: {"train.warmup_ratio": v, "train.warmup_steps": 0} if 0 < v < 1
    else {"train.warmup_steps": int(v), "train.warmup_ratio": 0.0},  # transformers 5: a float < 1 is a ratio
    "save_total_limit": "train.save_total_limit", "seed": "train.seed", "bf16": lambda v: {"train.bf16": bool(v)},
    "fp16": "train.fp16", "use_cpu": "train.use_cpu",
    "gradient_checkpointing": lambda v: {"train.gradient_checkpointing": bool(v)},
    "activation_checkpointing": lambda v: {"train.gradient_checkpointing": bool(v)},  # transformers 5's name
    "optim": lambda v: {"train.optim": getattr(v, "value", v)}, "optim_args": "train.optim_args",
    "report_to": _report_to, "run_name": "train.run_name", "dataloader_num_workers": "train.dataloader_num_workers",
    "train_sampling_strategy": _sampling,
    "model_init_kwargs": _model_init_kwargs,
    "trust_remote_code": "model.trust_remote_code",
}

#: carried out by the trainer (its schedule follows transformers.Trainer's), not by alignkit keys
BY_TRAINER = {"eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "logging_strategy", "logging_steps",
              "logging_first_step", "save_strategy", "save_steps", "load_best_model_at_end", "metric_for_best_model",
              "greater_is_better", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
              "hub_always_push", "hub_revision", "disable_tqdm", "resume_from_checkpoint", "debug", "log_level",
              "save_only_model", "remove_unused_columns", "do_train", "do_eval", "do_predict"}

_NO_EFFECT = "no effect on the trained weights"
IGNORED: dict[str, str] = {name: _NO_EFFECT for name in (
    "prediction_loss_only", "eval_accumulation_steps", "torch_empty_cache_steps", "log_level_replica",
    "log_on_each_node", "logging_nan_inf_filter", "include_num_input_tokens_seen", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "eval_do_concat_batches", "eval_use_gather_object",
    "include_for_metrics", "batch_eval_metrics", "save_on_each_node", "enable_jit_checkpoint",
    "restore_callback_states_from_checkpoint", "tf32", "local_rank", "ddp_backend", "ddp_timeout",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataloader_in_order", "label_names", "length_column_name",
    "skip_memory_metrics", "full_determinism", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs",
    "use_cache", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "average_tokens_across_devices", "activation_offloading",
    "dataset_num_proc", "pad_to_multiple_of")}
IGNORED["average_tokens_across_devices"] = "alignkit always normalises token losses across devices"
IGNORED["activation_offloading"] = "a memory saving only; alignkit keeps activations on the device"

REJECTED: dict[str, str] = {
    "neftune_noise_alpha": "NEFTune is not supported",
    "dataloader_drop_last": "alignkit keeps the last partial batch",
    "data_seed": "alignkit shuffles with seed",
    "bf16_full_eval": "eval runs in the training precision",
    "fp16_full_eval": "eval runs in the training precision",
    "fsdp": "run under `accelerate launch --config_file` with an FSDP config",
    "fsdp_config": "run under `accelerate launch --config_file` with an FSDP config",
    "deepspeed": "run under `accelerate launch --config_file` with a DeepSpeed config",
    "accelerator_config": "run under `accelerate launch --config_file`",
    "parallelism_config": "run under `accelerate launch --config_file`",
    "auto_find_batch_size": "set per_device_train_batch_size",
    "ignore_data_skip": "alignkit always resumes at the exact data position",
    "optim_target_modules": "not supported",
    "label_smoothing_factor": "alignkit's losses do not smooth labels",
    "use_liger_kernel": "Liger kernels are not supported (alignkit's chunked loss already never materialises the "
                        "logits)",
    "liger_kernel_config": "Liger kernels are not supported",
}


@dataclass
class TrainingArgumentsBridge(TrainingArguments):
    """TRL 1.x's base config over transformers.TrainingArguments, mapped to alignkit by `to_alignkit()`."""

    #: the plugin module that registers the method (its config's fields take same-named dataclass fields)
    method_plugin: ClassVar[Any] = None
    #: a field whose alignkit key has another name (or a function of the value giving overrides)
    method_keys: ClassVar[dict[str, Any]] = {}
    #: a method field alignkit cannot honour -> the reason (refused when set away from its default)
    unsupported: ClassVar[dict[str, str]] = {}
    #: a method field ignored with a warning (cannot change the trained weights) -> why
    ignored: ClassVar[dict[str, str]] = {}

    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a float < 1: a ratio of "
                                                                "the total training steps)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the backward "
                                                                         "pass to save memory."})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 mixed precision (default: on unless fp16)."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra lr_scheduler arguments."})
    use_liger_kernel: bool = field(default=False, metadata={"help": "Refused: Liger kernels are not supported."})
    torch_empty_cache_steps: int | None = field(default=None, metadata={"help": "Steps between empty_cache calls."})

    def __post_init__(self) -> None:
        if self.bf16 is None:  # TRL 1.16: on unless fp16 (and it then refuses a machine without bf16 but use_cpu);
            # here, as TRL's later releases, also off where neither use_cpu nor the accelerator offers bf16
            from transformers.utils import is_torch_bf16_gpu_available

            self.bf16 = not self.fp16 and (self.use_cpu or is_torch_bf16_gpu_available())
        if getattr(self, "pad_to_multiple_of", None) == "auto":
            self.pad_to_multiple_of = None  # TRL: 128 on Neuron (AWS Trainium) only
        super().__post_init__()

    def to_alignkit(self) -> dict[str, Any]:
        """alignkit dotted overrides; warns for what is ignored and raises ValueError for what is refused."""
        cls = type(self)
        method_fields = set(method_config(cls.method_plugin).model_fields) if cls.method_plugin is not None else set()
        out: dict[str, Any] = {}
        reference = _resolved_defaults(cls, self.use_cpu)
        for f in dataclasses.fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in BY_TRAINER:
                continue
            if name in TRAIN:
                out.update(_mapped(TRAIN[name], value))
            elif name in cls.method_keys:
                out.update(_mapped(cls.method_keys[name], value))
            elif name in method_fields and name not in cls.unsupported:
                out[f"method.{name}"] = value
            elif value in (_default(f), reference.get(name, _default(f))):
                continue  # (the reference: a default instance after __post_init__, which fills some fields)
            elif name in cls.ignored or name in IGNORED:
                reason = cls.ignored.get(name) or IGNORED[name]
                warnings.warn(f"{cls.__name__}.{name}={value!r} is ignored by alignkit ({reason})", stacklevel=3)
            else:
                reason = cls.unsupported.get(name) or REJECTED.get(name) or "alignkit has no equivalent"
                raise ValueError(f"{cls.__name__}.{name}={value!r} is not supported by alignkit and would change the "
                                 f"result: {reason}")
        return out


def table_config(name: str, rows: list[tuple[str, Any, Any]], plugin, module: str, doc: str,
                 normalise: Any = None, **class_vars) -> type:
    """A TrainingArgumentsBridge dataclass `name` with a field per (field name, type, default) row (a list or dict
    default is copied per instance), its help from the method config's description; `class_vars` set
    unsupported / ignored / method_keys; `normalise(config)` runs first in __post_init__ (TRL's own value
    normalisation, e.g. a bool given for a string field)."""
    descriptions = {k: f.description for k, f in method_config(plugin).model_fields.items() if f.description}
    fields = []
    for fname, kind, default in rows:
        meta = {"help": descriptions.get(fname, f"As TRL 1.16's {name}.{fname}.")}
        spec = (field(default_factory=lambda d=default: type(d)(d), metadata=meta) if isinstance(default, list | dict)
                else field(default=default, metadata=meta))
        fields.append((fname, kind, spec))
    namespace = {}
    if normalise is not None:
        def __post_init__(self) -> None:
            normalise(self)
            TrainingArgumentsBridge.__post_init__(self)

        namespace["__post_init__"] = __post_init__
    cls = dataclasses.make_dataclass(name, fields, bases=(TrainingArgumentsBridge,), namespace=namespace)
    cls.__module__, cls.__doc__, cls.method_plugin = module, doc, plugin
    for key, value in class_vars.items():
        setattr(cls, key, value)
    return cls


@functools.cache
def method_config(plugin) -> type:
    """The config class of the method `plugin` (a module with a register_methods hook) registers, with the fields
    of its formatter's data config (as `alignkit run` resolves it)."""
    from alignkit import get_plugin_manager, load_config

    found = []
    plugin.register_methods(register=found.append)
    pm = get_plugin_manager(load_entrypoints=False, plugins=[plugin])
    return load_config(found[0].name, {}, {}, plugins=pm)[1].config


def _mapped(spec, value) -> dict[str, Any]:
    return spec(value) if callable(spec) else {spec: value}


_RESOLVED: dict[tuple[type, bool], dict[str, Any]] = {}


def _resolved_defaults(cls: type, use_cpu: bool) -> dict[str, Any]:
    """The field values of a default instance after __post_init__ (which fills some: accelerator_config, and
    dataloader_pin_memory off with use_cpu)."""
    if (cls, use_cpu) not in _RESOLVED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = cls(output_dir="trainer_output", bf16=False, fp16=False, use_cpu=use_cpu)  # bf16: always mapped
        _RESOLVED[cls, use_cpu] = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
    return _RESOLVED[cls, use_cpu]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
