"""SFTConfig / SFTTrainer: TRL 1.16's SFT trainer surface on alignkit's engine (`from alignkit_trl import ...`).

SFTConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the SFT fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. Imported on first use only (alignkit_trl's lazy names), never by `alignkit run`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import alignkit_sft
from alignkit.trainer_facade import FacadeTrainer, TrainingArgumentsBridge


@dataclass
class SFTConfig(TrainingArgumentsBridge):
    """TRL 1.16's SFTConfig: learning_rate 2e-5, max_length 1024, packing off, completion-only loss on
    prompt-completion rows, ..."""

    method_plugin: ClassVar = alignkit_sft
    unsupported: ClassVar[dict[str, str]] = {
        "chat_template_path": "set the tokenizer's chat template (tokenizer.chat_template) before passing it",
        "dataset_kwargs": "alignkit formats the rows itself; pass the rows in the shape you want",
        "eos_token": "set the tokenizer's eos_token before passing it",
        "pad_token": "set the tokenizer's pad_token before passing it",
        "shuffle_dataset": "alignkit shuffles the rows every epoch with seed",
        "packing_strategy": "alignkit packs with its own best-fit strategy (packing=True)",
        "padding_free": "alignkit pads each batch (packing=True removes the padding)",
        "eval_packing": "eval data is packed exactly when the training data is",
        "loss_type": "alignkit's SFT loss is the token NLL ('nll')",
        "router_aux_loss_coef": "MoE router auxiliary losses are not added",
    }

    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})
    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={
        "help": "Keyword arguments for loading the model from a name (dtype, revision, attn_implementation...)."})
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
    packing: bool = field(default=False, metadata={"help": "Pack rows into max_length sequences."})
    packing_strategy: str = field(default="bfd", metadata={"help": "Refused unless 'bfd'."})
    padding_free: bool = field(default=False, metadata={"help": "Refused when True."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Ignored (padding only)."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Refused when set."})
    completion_only_loss: bool | None = field(default=None, metadata={
        "help": "Train on completions only (None: on for prompt-completion rows)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Train on assistant turns only."})
    loss_type: str = field(default="nll", metadata={"help": "Refused unless 'nll'."})
    activation_offloading: bool = field(default=False, metadata={"help": "Ignored (memory only)."})
    pad_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's pad_token."})

    def __post_init__(self) -> None:
        if self.loss_type == "chunked_nll":  # TRL's deprecated spelling of the same loss
            self.loss_type = "nll"
        super().__post_init__()


class SFTTrainer(FacadeTrainer):
    """TRL 1.16's SFTTrainer on alignkit's engine, sequence formatter and SFT loss."""

    _tag_names = ["trl", "sft"]

    def __init__(self, model, args: SFTConfig | None = None, data_collator: Callable | None = None,
                 train_dataset=None, eval_dataset=None, processing_class=None,
                 compute_loss_func: Callable | None = None,
                 compute_metrics: Callable | None = None, callbacks=None, optimizers: tuple = (None, None),
                 optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics: Callable | None = None,
                 quantization_config=None, peft_config=None, formatting_func: Callable | None = None) -> None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        self.args = self._args(args, SFTConfig, f"{name.split('/')[-1]}-SFT")
        self._refuse(data_collator=(data_collator, "alignkit's formatter pads and collates the rows"),
                     compute_loss_func=(compute_loss_func, "alignkit trains with the SFT loss"),
                     compute_metrics=(compute_metrics, "alignkit reports eval_loss and mean_token_accuracy"),
                     optimizer_cls_and_kwargs=(optimizer_cls_and_kwargs, "set optim and optim_args"),
                     preprocess_logits_for_metrics=(preprocess_logits_for_metrics, "no compute_metrics"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"))
        if formatting_func is not None:  # TRL turns each row into its text with it
            train_dataset = _formatted(train_dataset, formatting_func, self.args.dataset_text_field)
            eval_dataset = _formatted(eval_dataset, formatting_func, self.args.dataset_text_field)
        self.formatting_func, self.compute_metrics = formatting_func, None
        self._start("sft", [alignkit_sft], model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config)
        self.data_collator = self.formatter.collate


def _formatted(ds, fn: Callable, column: str):
    return None if ds is None else ds.map(lambda row: {column: fn(row)})
