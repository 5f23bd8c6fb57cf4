"""SFTConfig / SFTTrainer: TRL 1.16's SFT trainer surface on alignkit's engine (`from alignkit_trl import ...`).

SFTConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the SFT fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. Imported on first use only (alignkit_trl's lazy names), never by `alignkit run`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import alignkit_sft
from alignkit.trainer_facade import FacadeTrainer, LogitsEvaluation, TrainingArgumentsBridge


@dataclass
class SFTConfig(TrainingArgumentsBridge):
    """TRL 1.16's SFTConfig: learning_rate 2e-5, max_length 1024, packing off, completion-only loss on
    prompt-completion rows, ..."""

    method_plugin: ClassVar = alignkit_sft
    unsupported: ClassVar[dict[str, str]] = {
        "chat_template_path": "set the tokenizer's chat template (tokenizer.chat_template) before passing it",
        "eos_token": "set the tokenizer's eos_token before passing it",
        "pad_token": "set the tokenizer's pad_token before passing it",
        "shuffle_dataset": "alignkit shuffles the rows every epoch with seed",
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
    packing_strategy: str = field(default="bfd", metadata={"help": "bfd or wrapped (bfd_split refused)."})
    padding_free: bool = field(default=False, metadata={"help": "Refused when True."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Ignored (padding only)."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval rows (None: as packing)."})
    completion_only_loss: bool | None = field(default=None, metadata={
        "help": "Train on completions only (None: on for prompt-completion rows)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Train on assistant turns only."})
    loss_type: str = field(default="nll", metadata={"help": "nll or dft (each token's NLL times its probability)."})
    activation_offloading: bool = field(default=False, metadata={"help": "Ignored (memory only)."})
    pad_token: str | None = field(default=None, metadata={"help": "Refused: set the tokenizer's pad_token."})

    method_keys: ClassVar[dict[str, Any]] = {"dataset_kwargs": lambda v: {}, "padding_free": lambda v: {},
                                             "packing_strategy": lambda v: _packing_strategy(v)}

    def __post_init__(self) -> None:
        if self.loss_type == "chunked_nll":  # TRL's deprecated spelling of the same loss
            self.loss_type = "nll"
        super().__post_init__()

    @property
    def skip_prepare_dataset(self) -> bool:
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset", False))

    def to_alignkit(self) -> dict[str, Any]:
        """As the base, plus TRL's dataset_kwargs (skip_prepare_dataset only: the rows are trainer-ready and kept
        as given, untruncated) and padding_free (alignkit's packed rows carry no padding; without packing, TRL
        enforces no max_length, so it must be None: then each batch's loss is the padded batch's)."""
        extra = set(self.dataset_kwargs or {}) - {"skip_prepare_dataset"}
        if extra:
            raise ValueError(f"SFTConfig.dataset_kwargs keys {sorted(extra)} are not supported by alignkit: only "
                             "skip_prepare_dataset is (alignkit formats the rows itself)")
        if self.padding_free and not self.packing and self.max_length is not None:
            raise ValueError("When `padding_free=True` without packing, `max_length` is not enforced. Either enable "
                             "packing (e.g., `packing=True, packing_strategy='bfd'`), provide already truncated "
                             "inputs, or set `max_length=None`.")
        out = super().to_alignkit()
        if self.skip_prepare_dataset:
            if self.packing:
                raise ValueError("SFTConfig.dataset_kwargs={'skip_prepare_dataset': True} with packing=True is not "
                                 "supported by alignkit: skipped preparation packs nothing; set packing=False")
            out["method.max_length"] = None  # TRL truncates only while preparing
        return out


class SFTTrainer(LogitsEvaluation, FacadeTrainer):
    """TRL 1.16's SFTTrainer on alignkit's engine, sequence formatter and SFT loss."""

    _tag_names = ["trl", "sft"]
    summary_has_step_metrics = True

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
                     optimizer_cls_and_kwargs=(optimizer_cls_and_kwargs, "set optim and optim_args"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"))
        for ds in _each(train_dataset) + _each(eval_dataset):
            _check_trainer_ready(ds, self.args.skip_prepare_dataset)
        if formatting_func is not None:  # TRL turns each row into its text with it
            train_dataset = _formatted(train_dataset, formatting_func, self.args.dataset_text_field)
            eval_dataset = _formatted(eval_dataset, formatting_func, self.args.dataset_text_field)
        self.formatting_func, self.compute_metrics = formatting_func, compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self._start("sft", [alignkit_sft], model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config)
        self.data_collator = self.formatter.collate


def _formatted(ds, fn: Callable, column: str):
    return None if ds is None else ds.map(lambda row: {column: fn(row)})


def _packing_strategy(value: str) -> dict[str, Any]:
    if value == "bfd-requeue":  # TRL's deprecated name of bfd_split
        value = "bfd_split"
    if value not in ("bfd", "wrapped"):
        raise ValueError(f"SFTConfig.packing_strategy={value!r} is not supported by alignkit and would change the "
                         "result: alignkit packs with 'bfd' (an over-long example is cut) or 'wrapped'")
    return {"method.packing_strategy": value}


def _each(ds) -> list:
    return [] if ds is None else list(ds.values()) if isinstance(ds, dict) else [ds]


def _check_trainer_ready(ds, skip_prepare: bool) -> None:
    """TRL's refusals of datasets it cannot prepare (with_transform) or that skip_prepare_dataset would mistrain
    (mask columns without labels); alignkit also needs skipped rows to be tokenized (it reads no transform)."""
    import datasets

    if isinstance(ds, datasets.Dataset) and ds.format["type"] == "custom":
        raise ValueError(
            "SFTTrainer cannot prepare a dataset that uses `Dataset.with_transform()`. The preparation pipeline "
            "calls `Dataset.map()`, which reads through the transform and can bake a random or stateful transform "
            "into the tokenized columns. Pass `dataset_kwargs={'skip_prepare_dataset': True}` and make the "
            "transform return trainer-ready examples, including tokenized fields, or materialize deterministic "
            "transforms with `Dataset.map()` before constructing the trainer. (alignkit reads no transform: "
            "materialize it with `Dataset.map()`.)")
    if not skip_prepare:
        return
    cols = set(ds.column_names or [])
    if "labels" not in cols and cols & {"completion_mask", "assistant_masks"}:
        raise ValueError(
            "The dataset has mask columns but no 'labels', and `skip_prepare_dataset=True` skips label building, so "
            "it would train on the full sequence. Add a 'labels' column (-100 for non-loss tokens) or drop "
            "`skip_prepare_dataset`.")
    if "input_ids" not in cols:
        raise ValueError(f"SFTConfig.dataset_kwargs={{'skip_prepare_dataset': True}} needs trainer-ready rows with "
                         f"'input_ids' (and 'labels'); the dataset has {sorted(cols)}: drop skip_prepare_dataset to "
                         "let the trainer tokenize them")
