"""RewardConfig / RewardTrainer: TRL 1.16's reward-model trainer surface on alignkit's engine
(`from alignkit_trl import ...`).

RewardConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the reward fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. Imported on first use only, never by `alignkit run`.
"""

from collections.abc import Callable
from typing import Any

import alignkit_reward
from alignkit.trainer_facade import FacadeTrainer
from alignkit.trainer_facade.args import table_config

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


class RewardTrainer(FacadeTrainer):
    """TRL 1.16's RewardTrainer on alignkit's engine: a sequence classifier with one output, Bradley-Terry loss."""

    _tag_names = ["trl", "reward-trainer"]

    def __init__(self, model, args=None, data_collator: Callable | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics: Callable | None = None, callbacks=None,
                 optimizers: tuple = (None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics: Callable | None = None, quantization_config=None,
                 peft_config=None) -> None:
        self.args = self._args(args, RewardConfig, f"{self._model_name(model).split('/')[-1]}-Reward")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the pairs"),
                     compute_metrics=(compute_metrics, "alignkit reports the reward eval metrics (accuracy, margin)"),
                     optimizer_cls_and_kwargs=(optimizer_cls_and_kwargs, "set optim and optim_args"),
                     preprocess_logits_for_metrics=(preprocess_logits_for_metrics, "no compute_metrics"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"))
        self.compute_metrics = None
        self._start("reward", [alignkit_reward], model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config)
        self.data_collator = self.formatter.collate
