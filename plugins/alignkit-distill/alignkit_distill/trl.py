"""TRL 1.16's distillation trainers on alignkit's distill method (`from alignkit_trl import ...`): GKDConfig /
GKDTrainer (trl.experimental.gkd) and DistillationConfig / DistillationTrainer (trl's stable one: on-policy from
prompts, the divergence at the sampling temperature).

GKDConfig is TRL's: SFTConfig plus temperature, lmbda, beta, max_new_tokens, teacher_model_name_or_path,
teacher_model_init_kwargs, disable_dropout and seq_kd, with TRL's defaults; the teacher is alignkit's
`model.ref_name_or_path`. TRL's GKD reads conversations (`messages`): the last message is the completion, the ones
before it the prompt; prompt-completion rows are taken as they are. Imported on first use only.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from alignkit_sft.trl import SFTConfig

import alignkit_distill
from alignkit.trainer_facade import FacadeTrainer, LogitsEvaluation
from alignkit.trainer_facade.args import table_config
from alignkit.trainer_facade.online import ONLINE_IGNORED, ONLINE_ROWS, ONLINE_UNSUPPORTED


def _sft_default_only(name: str, default: Any) -> Callable:
    def check(value):
        if value != default:
            raise ValueError(f"GKDConfig.{name}={value!r} is not supported by alignkit and would change the result: "
                             "the distill method has no such setting")
        return {}
    return check


@dataclass
class GKDConfig(SFTConfig):
    """TRL 1.16's GKDConfig (trl.experimental.gkd): SFTConfig's fields and defaults plus GKD's."""

    method_plugin: ClassVar = alignkit_distill
    method_keys: ClassVar[dict[str, Any]] = {
        **SFTConfig.method_keys, "packing_strategy": _sft_default_only("packing_strategy", "bfd"),
        "teacher_model_name_or_path": lambda v: {"model.ref_name_or_path": v} if v else {}}
    unsupported: ClassVar[dict[str, str]] = {
        **SFTConfig.unsupported,
        "teacher_model_init_kwargs": "the teacher is loaded as the student is (model_init_kwargs); pass a loaded "
                                     "teacher_model to load it otherwise"}

    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of generated completions."})
    lmbda: float = field(default=0.5, metadata={"help": "Fraction of steps on the student's own samples."})
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD interpolation (0: KL, 1: reverse KL)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled completion."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The teacher's name or folder."})
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Refused."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout of the student to 0."})
    seq_kd: bool = field(default=False, metadata={"help": "Off-policy steps on the teacher's samples."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lmbda < 0.0 or self.lmbda > 1.0:
            raise ValueError("lmbda must be in the range [0.0, 1.0].")
        if self.beta < 0.0 or self.beta > 1.0:
            raise ValueError("beta must be in the range [0.0, 1.0].")


class GKDTrainer(LogitsEvaluation, FacadeTrainer):
    """TRL 1.16's GKDTrainer on alignkit's engine and its distill method (the teacher is the reference model)."""

    _tag_names = ["trl", "gkd"]
    summary_has_step_metrics = True

    def __init__(self, model=None, teacher_model=None, args: GKDConfig | None = None,
                 data_collator: Callable | None = None, train_dataset=None, eval_dataset=None, processing_class=None,
                 compute_metrics: Callable | None = None, callbacks=None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Callable | None = None, peft_config=None,
                 formatting_func: Callable | None = None) -> None:
        self.args = self._args(args, GKDConfig, f"{self._model_name(model).split('/')[-1]}-GKD")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the rows"),
                     formatting_func=(formatting_func, "pass conversations ('messages') or prompt-completion rows"))
        if teacher_model is None and not self.args.teacher_model_name_or_path:
            raise ValueError("GKDTrainer needs a teacher: pass teacher_model (a model loaded with from_pretrained, "
                             "or its name or folder) or set GKDConfig.teacher_model_name_or_path")
        overrides = self._ref_model_overrides(teacher_model, model) if teacher_model is not None else {}
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        self._start("distill", [alignkit_distill], model, self.args, _prompt_completion(train_dataset),
                    _prompt_completion(eval_dataset), processing_class, None, callbacks, optimizers, peft_config,
                    overrides=overrides)
        self.data_collator = self.formatter.collate

    @property
    def teacher_model(self):
        return self.ref_model


def _prompt_completion(ds):
    """TRL's GKD rows (`messages`: the last message is the completion) as prompt-completion rows."""
    if isinstance(ds, dict):
        return {k: _prompt_completion(v) for k, v in ds.items()}
    if ds is None or "messages" not in (ds.column_names or []):
        return ds
    return ds.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                  remove_columns=["messages"])


# ---- TRL 1.16's stable DistillationTrainer: on-policy distillation from prompts ---------------------------------

_ROWS = {name: (name, kind, default) for name, kind, default in ONLINE_ROWS}
#: (name, type, default) of TRL 1.16's DistillationConfig beyond TrainingArguments, its order
DISTILLATION_ROWS: list[tuple[str, Any, Any]] = [
    _ROWS["learning_rate"], _ROWS["model_init_kwargs"], _ROWS["trust_remote_code"],
    ("teacher_model_name_or_path", str | None, None), ("teacher_model_revision", str | None, None),
    ("teacher_model_init_kwargs", dict | str | None, None), _ROWS["disable_dropout"], _ROWS["remove_unused_columns"],
    *(_ROWS[n] for n in ("max_completion_length", "ds3_gather_for_generation", "shuffle_dataset",
                         "pad_to_multiple_of", "temperature", "top_p", "top_k", "min_p", "generation_kwargs",
                         "chat_template_kwargs", "repetition_penalty", "cache_implementation", "use_vllm",
                         "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
                         "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
                         "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                         "vllm_tensor_parallel_size")),
    ("beta", float, 1.0), ("max_tool_calling_iterations", int | None, None),
    *(_ROWS[n] for n in ("log_completions", "num_completions_to_print", "log_unique_prompts")),
]
_SAMPLER = "distill samples with transformers' generate at `temperature`, top_p 1 and top_k 0"


def _completion_length(value) -> dict:
    if value is None:
        raise ValueError("DistillationConfig.max_completion_length=None is not supported by alignkit: give the most "
                         "new tokens per completion (TRL's default: 512)")
    return {"method.max_new_tokens": value}


_DistillationFields = table_config(
    "DistillationConfig", DISTILLATION_ROWS, alignkit_distill, __name__,
    "TRL 1.16's DistillationConfig: learning_rate 1e-6, beta 1.0 (reverse KL), temperature 1.0 for sampling and the "
    "divergence, max_completion_length 512, every step on the student's own samples, ...",
    method_keys={"max_completion_length": _completion_length,
                 "shuffle_dataset": lambda v: {"train.shuffle": bool(v)},
                 "teacher_model_name_or_path": lambda v: {"model.ref_name_or_path": v} if v else {},
                 "teacher_model_init_kwargs": lambda v: {}},  # checked against the student's in to_alignkit
    unsupported={**{k: v for k, v in ONLINE_UNSUPPORTED.items() if k.startswith("vllm_")},
                 **dict.fromkeys(("top_p", "top_k", "min_p", "generation_kwargs", "repetition_penalty"), _SAMPLER),
                 "use_vllm": _SAMPLER, "chat_template_kwargs": "not supported",
                 "teacher_model_revision": "load the teacher at that revision yourself and pass it as teacher_model",
                 "max_tool_calling_iterations": "tool calling is not supported by distill"},
    ignored=ONLINE_IGNORED,
)


class DistillationConfig(_DistillationFields):
    __doc__ = _DistillationFields.__doc__

    def to_alignkit(self) -> dict[str, Any]:
        """As every TRL-style config; the teacher loads with the student's settings (model.*), so its
        teacher_model_init_kwargs may only repeat them (TRL's distillation script fills both alike)."""
        out = super().to_alignkit()
        teacher = {k: v for k, v in _as_dict(self.teacher_model_init_kwargs).items() if v is not None}
        student = _as_dict(self.model_init_kwargs)
        differing = sorted(k for k, v in teacher.items() if student.get(k) != v)
        if differing:
            raise ValueError(f"DistillationConfig.teacher_model_init_kwargs={teacher!r} is not supported by alignkit "
                             f"and would change the result: the teacher loads with the student's settings; "
                             f"{', '.join(differing)} differ from model_init_kwargs (load the teacher yourself and "
                             "pass it as teacher_model)")
        return out


def _as_dict(value) -> dict:
    import json

    return json.loads(value) if isinstance(value, str) else dict(value or {})


class DistillationTrainer(FacadeTrainer):
    """TRL 1.16's DistillationTrainer on alignkit's engine and its `distill` method: every training step distils on
    the student's own samples of the rows' prompts (lmbda 1), the divergence at the sampling temperature, the
    teacher (`teacher_model` or DistillationConfig.teacher_model_name_or_path) as the reference model."""

    _tag_names = ["trl", "distillation"]

    def __init__(self, model, teacher_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers: tuple = (None, None), quantization_config=None,
                 peft_config=None, tools: list | None = None) -> None:
        self.args = self._args(args, DistillationConfig, f"{self._model_name(model).split('/')[-1]}-Distillation")
        self._refuse(quantization_config=(quantization_config, "load the quantized model yourself and pass it"),
                     tools=(tools, "tool calling is not supported by distill"))
        teacher_model = teacher_model if teacher_model is not None else self.args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs `teacher_model` (a model loaded with from_pretrained, or its "
                             "name) or DistillationConfig.teacher_model_name_or_path")
        self.compute_metrics = None
        overrides = {**self._ref_model_overrides(teacher_model, model), "method.lmbda": 1.0,
                     "method.temperature_in_loss": True}
        self._start("distill", [alignkit_distill], model, self.args, train_dataset, eval_dataset, processing_class,
                    None, callbacks, optimizers, peft_config, overrides=overrides)
        self.data_collator = self.formatter.collate
