"""TRL 1.16's distillation trainers on alignkit's engine and its `distill` method (`from alignkit_trl import ...`):
GKDConfig / GKDTrainer (trl.experimental.gkd) and DistillationConfig / DistillationTrainer (trl's stable one:
on-policy from prompts, the divergence at the sampling temperature).

GKDConfig has TRL 1.16's fields and defaults: transformers.TrainingArguments, the SFTConfig fields GKDConfig
inherits, and GKD's own (temperature, lmbda, beta, max_new_tokens, seq_kd, teacher_model_name_or_path, ...). Each maps
to alignkit's `distill` method (the same names), is ignored with a warning where that cannot change the weights, or
is refused with the reason. The teacher is the reference model (`model.ref_name_or_path`). Imported on first use
only (alignkit_trl's lazy names), never by `alignkit run`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import alignkit_distill
from alignkit.trainer_facade import FacadeTrainer, TrainingArgumentsBridge
from alignkit.trainer_facade.args import table_config
from alignkit.trainer_facade.online import ONLINE_IGNORED, ONLINE_ROWS, ONLINE_UNSUPPORTED

_PADDING = "Ignored (padding only)."


@dataclass
class GKDConfig(TrainingArgumentsBridge):
    """TRL 1.16's GKDConfig: learning_rate 2e-5 (SFTConfig's), temperature 0.9, lmbda 0.5, beta 0.5, max_new_tokens
    128, max_length 1024, seq_kd off, ..."""

    method_plugin: ClassVar = alignkit_distill
    unsupported: ClassVar[dict[str, str]] = {
        "chat_template_path": "set the tokenizer's chat template (tokenizer.chat_template) before passing it",
        "dataset_kwargs": "alignkit formats the rows itself; pass the rows in the shape you want",
        "eos_token": "set the tokenizer's eos_token before passing it",
        "pad_token": "set the tokenizer's pad_token before passing it",
        "shuffle_dataset": "alignkit shuffles the rows every epoch with seed",
        "packing": "distillation samples per prompt and cannot pack rows",
        "packing_strategy": "distillation does not pack rows",
        "padding_free": "alignkit pads each batch",
        "eval_packing": "distillation does not pack rows",
        "loss_type": "distillation's loss is the generalized JSD (beta)",
        "router_aux_loss_coef": "MoE router auxiliary losses are not added",
        "completion_only_loss": "distillation trains the completion only (the prompt is what both models sample "
                                "from)",
        "teacher_model_init_kwargs": "load the teacher yourself and pass it as teacher_model",
    }
    #: the teacher named in the config is the reference model (GKDTrainer's teacher_model takes precedence)
    method_keys: ClassVar[dict[str, Any]] = {
        "teacher_model_name_or_path": lambda v: {"model.ref_name_or_path": v} if v else {}}

    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})
    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Model loading kwargs."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repository."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Refused (MoE auxiliary loss)."})
    chat_template_path: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's template."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of LM rows."})
    dataset_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Refused."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    eos_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's eos_token."})
    max_length: int | None = field(default=1024, metadata={"help": "Maximum tokens per row (truncated beyond)."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start or keep_end."})
    shuffle_dataset: bool = field(default=False, metadata={"help": "Refused when True."})
    packing: bool = field(default=False, metadata={"help": "Refused when True."})
    packing_strategy: str = field(default="bfd", metadata={"help": "Refused when changed."})
    padding_free: bool = field(default=False, metadata={"help": "Refused when True."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": _PADDING})
    eval_packing: bool | None = field(default=None, metadata={"help": "Refused when set."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "Refused when False."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Train on assistant turns only."})
    loss_type: str = field(default="nll", metadata={"help": "Refused when changed."})
    activation_offloading: bool = field(default=False, metadata={"help": "Ignored (memory only)."})
    pad_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's pad_token."})
    # ---- GKD's own fields ----
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of generated completions."})
    lmbda: float = field(default=0.5, metadata={"help": "Fraction of steps on the student's own samples."})
    beta: float = field(default=0.5, metadata={"help": "Generalized JSD interpolation: 0 forward KL, 1 reverse KL."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated completion."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The teacher's name or folder, when GKDTrainer is given no teacher_model."})
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Refused."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout of the student to 0."})
    seq_kd: bool = field(default=False, metadata={"help": "Off-policy steps train on the teacher's samples."})

    def __post_init__(self) -> None:
        for name in ("lmbda", "beta"):  # TRL's own checks, in its words
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in the range [0.0, 1.0].")
        super().__post_init__()


class GKDTrainer(FacadeTrainer):
    """TRL 1.16's GKDTrainer on alignkit's engine and its `distill` method: the teacher (`teacher_model`, a model
    loaded with from_pretrained or a name) is the reference model."""

    _tag_names = ["trl", "gkd"]

    def __init__(self, model=None, teacher_model=None, args: GKDConfig | None = None,
                 data_collator: Callable | None = None, train_dataset=None, eval_dataset=None, processing_class=None,
                 compute_metrics: Callable | None = None, callbacks=None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Callable | None = None, peft_config=None,
                 formatting_func: Callable | None = None) -> None:
        self.args = self._args(args, GKDConfig, f"{self._model_name(model).split('/')[-1]}-GKD")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the rows"),
                     compute_metrics=(compute_metrics, "alignkit reports the distillation eval metrics"),
                     preprocess_logits_for_metrics=(preprocess_logits_for_metrics, "alignkit reports the "
                                                    "distillation eval metrics"),
                     formatting_func=(formatting_func, "pass rows with prompt/completion or messages columns"))
        teacher_model = teacher_model if teacher_model is not None else self.args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("GKDTrainer needs `teacher_model` (a model loaded with from_pretrained, or its name) or "
                             "GKDConfig.teacher_model_name_or_path")
        self.compute_metrics = None
        self._start("distill", [alignkit_distill], model, self.args, train_dataset, eval_dataset, processing_class,
                    None, callbacks, optimizers, peft_config,
                    overrides=_teacher("GKDTrainer", teacher_model, model))
        self.data_collator = self.formatter.collate


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
        overrides = {**_teacher("DistillationTrainer", teacher_model, model), "method.lmbda": 1.0,
                     "method.temperature_in_loss": True}
        self._start("distill", [alignkit_distill], model, self.args, train_dataset, eval_dataset, processing_class,
                    None, callbacks, optimizers, peft_config, overrides=overrides)
        self.data_collator = self.formatter.collate


def _teacher(owner: str, teacher_model, model) -> dict:
    """The teacher as alignkit's model.ref_name_or_path: its name or the folder it was loaded from."""
    if teacher_model is model:
        raise ValueError(f"{owner}: `model` and `teacher_model` cannot be the same object; load the teacher "
                         "separately (or pass its name)")
    path = teacher_model if isinstance(teacher_model, str) else getattr(teacher_model.config, "_name_or_path", "")
    if not path:
        raise ValueError(f"{owner}(teacher_model=...): alignkit loads the teacher itself; pass a model loaded with "
                         "from_pretrained (its name or folder) or a name")
    return {"model.ref_name_or_path": path}
