"""DPOConfig / DPOTrainer: TRL 1.16's DPO trainer surface on alignkit's engine (`from alignkit_trl import ...`).

DPOConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the DPO fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. Imported on first use only (alignkit_trl's lazy names), never by `alignkit run`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import alignkit_dpo
from alignkit.trainer_facade import FacadeTrainer, LogitsEvaluation, TrainingArgumentsBridge, TRLColumns


@dataclass
class DPOConfig(TrainingArgumentsBridge):
    """TRL 1.16's DPOConfig: learning_rate 1e-6, beta 0.1, loss_type ["sigmoid"], max_length 1024, ..."""

    method_plugin: ClassVar = alignkit_dpo
    unsupported: ClassVar[dict[str, str]] = {
        "precompute_ref_batch_size": "the reference is precomputed with per_device_eval_batch_size",
        "padding_free": "alignkit pads each batch",
        "pad_token": "set the tokenizer's pad_token before passing it",
        "router_aux_loss_coef": "MoE router auxiliary losses are not added",
    }

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Model loading kwargs."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repository."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "Refused (MoE auxiliary loss)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout of the model to 0."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    max_length: int | None = field(default=1024, metadata={"help": "Maximum prompt + completion tokens."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start or keep_end."})
    padding_free: bool = field(default=False, metadata={"help": "Refused when True."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Ignored (padding only)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Score the reference once, up front."})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "Refused when set."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": "DPO loss type(s)."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the loss types."})
    ld_alpha: float | None = field(default=None, metadata={"help": "LD-DPO verbose-token weight."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "f-divergence of the implicit reward."})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of the alpha divergence."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Robust/cDPO label smoothing."})
    beta: float = field(default=0.1, metadata={"help": "Temperature of the implicit reward."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO weighting."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP's temperature."})
    activation_offloading: bool = field(default=False, metadata={"help": "Ignored (memory only)."})
    sync_ref_model: bool = field(default=False, metadata={"help": "TR-DPO: mix the policy into the reference."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO mixing weight."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: steps between syncs."})
    pad_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's pad_token."})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        super().__post_init__()


class DPOTrainer(LogitsEvaluation, TRLColumns, FacadeTrainer):
    """TRL 1.16's DPOTrainer on alignkit's engine, DPO formatter and DPO loss."""

    _tag_names = ["trl", "dpo"]
    metric_labels = "input_ids"  # TRL's DPO prediction_step: (loss, logits of [chosen; rejected], input_ids)
    summary_has_step_metrics = True  # TRL's DPO log adds the unlogged step metrics to the summary row too

    @staticmethod
    def trl_columns(row: dict) -> dict:
        """TRL's names: prompt_ids, and each answer's ids after the prompt (the tokens it trains on)."""
        out = {"prompt_ids": row["prompt_input_ids"]}
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            out[f"{side}_ids"] = [t for t, label in zip(ids, labels) if label != -100]
        return out

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator: Callable | None = None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics: Callable | None = None,
                 callbacks=None, optimizers: tuple = (None, None), quantization_config=None, peft_config=None) -> None:
        self.args = self._args(args, DPOConfig, f"{self._model_name(model).split('/')[-1]}-DPO")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the pairs"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"))
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, None
        self._own_ref = ref_model is not None or peft_config is not None  # else the untrained policy is the reference
        self._start("dpo", [alignkit_dpo], model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config, overrides=self._ref_model_overrides(ref_model, model))
        self.data_collator = self.formatter.collate

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """As TRL's: with precompute_ref_log_probs and no ref_model under full fine-tuning, a dataset first given
        here once training has started is refused (TRL keeps no reference then; alignkit refuses alike, so a TRL
        script behaves the same). The eval datasets given at init are evaluated."""
        given = [self._raw["eval"], *(self._eval_datasets or {}).values()]
        if (eval_dataset is not None and self.args.precompute_ref_log_probs and not self._own_ref
                and self.state.global_step > 0 and not any(self._raw_of(eval_dataset) is ds for ds in given)):
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training has started, "
                "because `precompute_ref_log_probs=True` and no `ref_model` was provided (full fine-tuning): the "
                "reference is only available before training. Provide this dataset as `eval_dataset` at "
                "initialization, pass an explicit `ref_model`, or set `precompute_ref_log_probs=False`.")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
