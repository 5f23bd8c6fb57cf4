"""ORPOConfig: every field of TRL v0.15.2's ORPOConfig, with its defaults, for `HfArgumentParser` and scripts.

The fields, their types and defaults are a table of TRL's (orpo_config_v0152.tsv, in TRL's order); the dataclass is
built from it, with the behaviour below.

Each field set to a non-default value is mapped to an alignkit key, carried out by the ORPOTrainer
itself (logging, evaluation and save strategies, best model, hub), ignored with a warning (only where
ignoring it cannot change the trained weights), or rejected with a message saying what to do instead.
As TrainingArguments does, construction fills the derived values (eval_steps from logging_steps, the
metric for the best model, ...).
"""

import ast
import dataclasses
import logging
import warnings
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any

from alignkit.trainer_facade import args as facade_args
from alignkit_orpo.trl.help import with_help

log = logging.getLogger(__name__)


#: the names the field table's types are written with
TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list, "None": None, "Any": Any}


def table_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """(name, type, field) of each row of orpo_config_v0152.tsv: TRL v0.15.2's ORPOConfig fields in its order, with
    their types and defaults (`factory:NAME`: a new NAME() for each config)."""
    rows = Path(__file__).with_name("orpo_config_v0152.tsv").read_text(encoding="utf-8").splitlines()
    out = []
    for row in rows:
        if not row or row.startswith("#"):
            continue
        name, annotation, default = row.split("\t")
        kind = eval(annotation, {"__builtins__": {}}, TYPES)  # our own table: type names and | only
        if default.startswith("factory:"):
            spec = field(default_factory=TYPES[default.removeprefix("factory:")])
        else:
            spec = field(default=ast.literal_eval(default))
        out.append((name, kind, spec))
    return out


class _ORPOConfigBehaviour:
    """What ORPOConfig does beyond holding its fields: TrainingArguments' derived values and the mapping to
    alignkit keys."""

    def __post_init__(self) -> None:
        # HfArgumentParser gives None for fields typed `str | list[str]`; TrainingArguments' defaults are meant
        for name in ("debug", "fsdp"):
            if getattr(self, name) is None:
                setattr(self, name, "")
        if self.evaluation_strategy is not None:  # the deprecated spelling, as TrainingArguments accepts it
            self.eval_strategy = self.evaluation_strategy
        for name in ("eval_strategy", "save_strategy", "logging_strategy", "lr_scheduler_type", "optim",
                     "hub_strategy"):
            value = getattr(self, name)
            setattr(self, name, getattr(value, "value", value))  # enums given by transformers users
        if self.adafactor:
            self.optim = "adafactor"
        if self.eval_strategy == "steps" and not self.eval_steps:
            if self.logging_steps <= 0:
                raise ValueError(f"ORPOConfig: eval_strategy={self.eval_strategy!r} needs eval_steps or logging_steps "
                                 "> 0")
            self.eval_steps = self.logging_steps
        if self.load_best_model_at_end and self.save_strategy != "best":
            if self.eval_strategy != self.save_strategy:
                raise ValueError("ORPOConfig.load_best_model_at_end needs save_strategy equal to eval_strategy, "
                                 f"got {self.save_strategy!r} and {self.eval_strategy!r}")
            if self.eval_strategy == "steps" and self.save_steps % self.eval_steps:
                raise ValueError("ORPOConfig.load_best_model_at_end needs save_steps to be a multiple of eval_steps, "
                                 f"got {self.save_steps} and {self.eval_steps}")
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    # ---- what transformers.TrainingArguments users read -------------------------------------------

    @property
    def world_size(self) -> int:
        from accelerate import PartialState

        return PartialState().num_processes

    @property
    def process_index(self) -> int:
        from accelerate import PartialState

        return PartialState().process_index

    @property
    def local_process_index(self) -> int:
        from accelerate import PartialState

        return PartialState().local_process_index

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def should_save(self) -> bool:
        return self.process_index == 0

    @property
    def should_log(self) -> bool:
        return self.process_index == 0

    @property
    def device(self):
        from accelerate import PartialState

        return PartialState().device

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json_string(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_alignkit(self) -> dict[str, Any]:
        """alignkit dotted overrides for the fields that differ from their defaults; warns or raises for the rest."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), _default(f)
            if value == default and f.name not in ALWAYS or f.name in BY_TRAINER:
                continue
            if f.name in MAPPED:
                out.update(MAPPED[f.name](value) if callable(MAPPED[f.name]) else {MAPPED[f.name]: value})
            elif f.name in IGNORED:
                warnings.warn(f"ORPOConfig.{f.name}={value!r} is ignored by alignkit ({IGNORED[f.name]})", stacklevel=3)
            else:
                _reject(f.name, value)
        return out



ORPOConfig = with_help(make_dataclass("ORPOConfig", table_fields(), bases=(_ORPOConfigBehaviour,)))
ORPOConfig.__module__ = __name__
ORPOConfig.__doc__ = "TRL v0.15.2's ORPOConfig fields and defaults (learning_rate 1e-6, beta 0.1, max_length 1024...)."


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _reject(name: str, value: Any):
    raise ValueError(f"ORPOConfig.{name}={value!r} is not supported by alignkit and would change the result: "
                     f"{REJECTED[name]}")


def _report_to(value) -> dict[str, Any]:
    names = [value] if isinstance(value, str) else list(value or [])
    return {"train.report_to": [n for n in names if n not in ("none", "all")]}


#: always passed, because alignkit's defaults differ from TRL v0.15.2's
ALWAYS = {"output_dir", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
          "per_device_eval_batch_size"}
#: carried out by the ORPOTrainer (its schedule follows transformers.Trainer's), not by alignkit keys
BY_TRAINER = {"eval_strategy", "evaluation_strategy", "eval_steps", "eval_delay", "eval_on_start", "logging_strategy",
              "logging_steps", "logging_first_step", "save_strategy", "save_steps", "load_best_model_at_end",
              "metric_for_best_model", "greater_is_better", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
              "hub_private_repo", "hub_always_push", "push_to_hub_model_id", "push_to_hub_organization",
              "push_to_hub_token", "disable_tqdm", "overwrite_output_dir", "resume_from_checkpoint", "debug",
              "log_level", "logging_dir", "save_only_model", "adafactor",
              "remove_unused_columns"}  # TRL asks for False; the trainer keeps the columns it needs either way

MAPPED: dict[str, Any] = {
    "output_dir": lambda v: {"train.output_dir": v or "trainer_output"},
    "learning_rate": "train.learning_rate", "weight_decay": "train.weight_decay", "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2", "adam_epsilon": "train.adam_epsilon", "max_grad_norm": "train.max_grad_norm",
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "per_device_eval_batch_size": "train.per_device_eval_batch_size",
    "per_gpu_train_batch_size": "train.per_device_train_batch_size",
    "per_gpu_eval_batch_size": "train.per_device_eval_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps", "lr_scheduler_type": "train.lr_scheduler_type",
    "lr_scheduler_kwargs": lambda v: {"train.lr_scheduler_kwargs": v or {}},
    "warmup_ratio": "train.warmup_ratio", "warmup_steps": "train.warmup_steps",
    "save_total_limit": "train.save_total_limit", "seed": "train.seed", "bf16": "train.bf16", "fp16": "train.fp16",
    "use_cpu": "train.use_cpu", "no_cuda": "train.use_cpu", "gradient_checkpointing": "train.gradient_checkpointing",
    # transformers 4's adamw_hf (its own AdamW, removed in transformers 5) trains as torch's AdamW
    "optim": lambda v: {"train.optim": "adamw_torch" if v == "adamw_hf" else v}, "optim_args": "train.optim_args",
    "report_to": _report_to, "run_name": "train.run_name",
    "dataloader_num_workers": "train.dataloader_num_workers", "group_by_length": "train.group_by_length",
    # alignkit's default chunked loss path already never materialises the logits
    "use_liger_kernel": lambda v: {"method.loss_implementation": "chunked"} if v else {},
    "beta": "method.beta", "max_length": "method.max_length", "max_prompt_length": "method.max_prompt_length",
    "max_completion_length": "method.max_completion_length", "disable_dropout": "method.disable_dropout",
    "label_pad_token_id": "method.label_pad_token_id", "padding_value": "method.padding_value",
    "truncation_mode": "method.truncation_mode", "generate_during_eval": "method.generate_during_eval",
    "dataset_num_proc": "method.dataset_num_proc", "is_encoder_decoder": "method.is_encoder_decoder",
    "model_init_kwargs": lambda v: {"model.init_kwargs": v or {}},
}

_NO_EFFECT = "no effect on the trained weights"
IGNORED = {name: _NO_EFFECT for name in (
    "overwrite_output_dir", "do_train", "do_eval", "do_predict", "prediction_loss_only", "eval_accumulation_steps",
    "eval_delay", "torch_empty_cache_steps", "log_level", "log_level_replica", "log_on_each_node", "logging_dir",
    "logging_strategy", "logging_nan_inf_filter", "save_safetensors", "save_on_each_node", "save_only_model",
    "restore_callback_states_from_checkpoint", "use_mps_device", "jit_mode_eval", "use_ipex", "tf32", "local_rank",
    "ddp_backend", "tpu_num_cores", "tpu_metrics_debug", "debug", "dataloader_prefetch_factor", "past_index",
    "remove_unused_columns", "label_names", "metric_for_best_model", "greater_is_better", "length_column_name",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "skip_memory_metrics", "use_legacy_prediction_loop", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "gradient_checkpointing_kwargs",
    "include_inputs_for_metrics", "include_for_metrics", "eval_do_concat_batches", "fp16_backend",
    "push_to_hub_model_id", "push_to_hub_organization", "push_to_hub_token", "mp_parameters", "full_determinism",
    "torchdynamo", "ray_scope", "ddp_timeout", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "include_tokens_per_second", "include_num_input_tokens_seen", "batch_eval_metrics", "eval_use_gather_object",
    "average_tokens_across_devices", "fp16_opt_level", "half_precision_backend", "label_smoothing_factor",
    )}
IGNORED.update({
    "label_smoothing_factor": "TRL's ORPO loss does not use it either",
    "average_tokens_across_devices": "alignkit always normalises token losses across devices",
})
for _name in BY_TRAINER:
    IGNORED.pop(_name, None)
REJECTED: dict[str, str] = {**facade_args.REJECTED,  # the shared refusals, and v0.15.2-era fields
    "split_batches": "set per_device_train_batch_size for each process",
    "dispatch_batches": "not supported",
    "fsdp_min_num_params": "run under `accelerate launch --config_file` with an FSDP config",
    "fsdp_transformer_layer_cls_to_wrap": "run under `accelerate launch --config_file` with an FSDP config",
    "tp_size": "tensor parallelism is not supported",
}
