"""GKDConfig / GKDTrainer: TRL 1.16's (experimental) GKD trainer surface on alignkit's distill method
(`from alignkit_trl import GKDConfig, GKDTrainer`).

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
