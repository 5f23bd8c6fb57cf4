"""RewardConfig / RewardTrainer: TRL 1.16's reward-model trainer surface on alignkit's engine
(`from alignkit_trl import ...`).

RewardConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the reward fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. Imported on first use only, never by `alignkit run`.
"""

import warnings
from collections.abc import Callable
from typing import Any

import alignkit_reward
from alignkit.trainer_facade import FacadeTrainer, LogitsEvaluation
from alignkit.trainer_facade.args import table_config
from alignkit_reward.formatter import TOKENIZED

ROWS: list[tuple[str, Any, Any]] = [
    ("learning_rate", float, 1e-4), ("model_init_kwargs", dict | str | None, None), ("trust_remote_code", bool, False),
    ("chat_template_path", str | None, None), ("disable_dropout", bool, True), ("dataset_num_proc", int | None, None),
    ("eos_token", str | None, None), ("max_length", int | None, 1024), ("pad_to_multiple_of", int | str | None, "auto"),
    ("center_rewards_coefficient", float | None, None), ("activation_offloading", bool, False),
    ("pad_token", str | None, None),
]

RewardConfig = table_config(
    "RewardConfig", ROWS, alignkit_reward, __name__,
    "TRL 1.16's RewardConfig: learning_rate 1e-4, max_length 1024, dropout disabled, ...",
    unsupported={"chat_template_path": "set the tokenizer's chat template before passing it",
                 "eos_token": "set the tokenizer's eos_token before passing it",
                 "pad_token": "set the tokenizer's pad_token before passing it"},
)


class RewardTrainer(LogitsEvaluation, FacadeTrainer):
    """TRL 1.16's RewardTrainer on alignkit's engine: a sequence classifier with one output, Bradley-Terry loss.
    compute_metrics gets what TRL's gives it: the scores [2B, 1] of each eval batch's B chosen then B rejected
    sequences, concatenated over batches, and an empty tuple as the labels (TRL's trainer has no label names)."""

    _tag_names = ["trl", "reward-trainer"]
    metric_labels = None

    def __init__(self, model, args=None, data_collator: Callable | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics: Callable | None = None, callbacks=None,
                 optimizers: tuple = (None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics: Callable | None = None, quantization_config=None,
                 peft_config=None) -> None:
        self.args = self._args(args, RewardConfig, f"{self._model_name(model).split('/')[-1]}-Reward")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the pairs"),
                     optimizer_cls_and_kwargs=(optimizer_cls_and_kwargs, "set optim and optim_args"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"))
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        for dataset in (train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])):
            _warn_legacy_columns(dataset)
        self._start("reward", [alignkit_reward], model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config)
        self.data_collator = self.formatter.collate


def _warn_legacy_columns(dataset) -> None:
    """TRL 1.16's FutureWarning for pre-tokenized rows under the older column names (read all the same)."""
    names = set(getattr(dataset, "column_names", None) or [])
    current, older = TOKENIZED
    if set(older) <= names and current[0] not in names:
        warnings.warn("`chosen_input_ids`/`rejected_input_ids` are TRL's older names for pre-tokenized pairs and will "
                      "not be supported in v1 of TRL's API; rename them to `chosen_ids`/`rejected_ids` (read the "
                      "same for now)", FutureWarning, stacklevel=3)
