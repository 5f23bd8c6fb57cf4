"""KTOConfig / KTOTrainer: TRL 1.16's KTO trainer surface on alignkit's engine (`from alignkit_trl import ...`).

KTOConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the KTO fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. Imported on first use only (alignkit_trl's lazy names), never by `alignkit run`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import alignkit_kto
from alignkit.trainer_facade import FacadeTrainer, LogitsEvaluation, TrainingArgumentsBridge


@dataclass
class KTOConfig(TrainingArgumentsBridge):
    """TRL 1.16's KTOConfig: learning_rate 1e-6, beta 0.1, loss_type "kto", rows in order (sequential), ..."""

    method_plugin: ClassVar = alignkit_kto
    unsupported: ClassVar[dict[str, str]] = {
        "precompute_ref_batch_size": "the reference is precomputed with per_device_eval_batch_size",
        "router_aux_loss_coef": "MoE router auxiliary losses are not added",
    }

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    train_sampling_strategy: str = field(default="sequential", metadata={
        "help": "Order of the training rows: sequential (TRL's KTO default: the KL pairs are fixed in order), random "
                "or group_by_length."})
    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Model loading kwargs."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repository."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Refused (MoE auxiliary loss)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout of the model to 0."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    max_length: int | None = field(default=1024, metadata={"help": "Maximum prompt + completion tokens."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Ignored (padding only)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Score the reference once, up front."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Refused when set."})
    loss_type: str = field(default="kto", metadata={"help": "kto or apo_zero_unpaired."})
    beta: float = field(default=0.1, metadata={"help": "Temperature of the implicit reward."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable examples' losses."})
    activation_offloading: bool = field(default=False, metadata={"help": "Ignored (memory only)."})
    sync_ref_model: bool = field(default=False, metadata={"help": "Mix the policy into the reference (TR-KTO)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "Mixing weight of the policy."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference syncs."})


class KTOTrainer(LogitsEvaluation, FacadeTrainer):
    """TRL 1.16's KTOTrainer on alignkit's engine, KTO formatter and KTO loss."""

    metric_labels = "input_ids"  # TRL's KTO prediction_step: (loss, logits, input_ids)

    _tag_names = ["trl", "kto"]
    summary_has_step_metrics = True

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, data_collator: Callable | None = None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics: Callable | None = None,
                 callbacks=None, optimizers: tuple = (None, None), quantization_config=None, peft_config=None) -> None:
        self.args = self._args(args, KTOConfig, f"{self._model_name(model).split('/')[-1]}-KTO")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the rows"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"))
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, None
        self._start("kto", [alignkit_kto], model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config, overrides=self._ref_model_overrides(ref_model, model))
        self.data_collator = self._collate

    def _trl_view(self, formatted):
        """TRL 1.16's prepared KTO rows have `prompt_ids` and `completion_ids`: the prompt's ids and the completion's
        (the trained positions; alignkit's completion ends with the EOS token)."""
        ignore = self.config.method.label_pad_token_id

        def ids(row):
            return {"prompt_ids": row["prompt_input_ids"],
                    "completion_ids": [i for i, t in zip(row["completion_input_ids"], row["completion_labels"])
                                       if t != ignore]}

        return formatted.map(ids, desc="TRL's prompt_ids / completion_ids")

    def _collate(self, features: list[dict]) -> dict:
        """The formatter's batch plus TRL's `completion_mask` / `KL_completion_mask` (1 on the completion)."""
        batch = self.formatter.collate(features)
        for prefix in ("", "KL_"):
            batch[f"{prefix}completion_mask"] = (batch[f"{prefix}labels"] != self.config.method.label_pad_token_id
                                                 ).long()
        return batch
