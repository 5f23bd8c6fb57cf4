"""ORPOTrainer: TRL v0.15.2's constructor, its documented methods and the transformers.Trainer surface TRL
users touch, on alignkit's engine with the ORPO formatter and loss (the maths lives there only)."""

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import DefaultFlowCallback, PreTrainedModel, PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState
from transformers.trainer_utils import EvalPrediction, PredictionOutput, TrainOutput, speed_metrics

from alignkit import Engine, apply_peft, get_plugin_manager, load_config, load_model, load_tokenizer, prepare_dataset
from alignkit_orpo.trl.args import ORPOConfig
from alignkit_orpo.trl.flow import TrainerFlow
from alignkit_orpo.trl.surface import TrainerSurface
from alignkit_orpo.trl.v0152 import V0152Methods

_TOKENIZED = "chosen_input_ids"  # a column only formatted (tokenized) preference rows have


class ORPOTrainer(V0152Methods, TrainerSurface):
    """TRL's ORPOTrainer surface on alignkit's engine, ORPO formatter and ORPO loss."""

    def __init__(self, model: PreTrainedModel | torch.nn.Module | str | None = None, args: ORPOConfig | None = None,
                 data_collator: Callable | None = None, train_dataset: datasets.Dataset | None = None,
                 eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
                 processing_class=None, model_init: Callable[[], PreTrainedModel] | None = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Callable | None = None, peft_config=None,
                 compute_metrics: Callable[[EvalPrediction], dict] | None = None) -> None:
        import alignkit_orpo  # this plugin's own module (imported here: it imports this one lazily)

        self.args = args or ORPOConfig(output_dir="trainer_output")
        if self.args.save_strategy == "best" and self.args.metric_for_best_model is None:
            raise ValueError("ORPOConfig.metric_for_best_model must be set when save_strategy='best'")
        if isinstance(eval_dataset, dict):
            raise ValueError("ORPOTrainer: alignkit evaluates one eval_dataset; pass a single datasets.Dataset")
        overrides = {**self.args.to_alignkit(), "train.disable_tqdm": True, "train.plots": False,  # callbacks print
                     "train.overwrite_output_dir": True, "train.checkpoint_dir": "."}  # Trainer's output_dir layout
        if model is None:
            if model_init is None:
                raise ValueError("ORPOTrainer needs `model` (a PreTrainedModel or a name) or `model_init`")
            model = model_init()
        if isinstance(model, str):
            overrides["model.name_or_path"] = model
        else:
            overrides["model.name_or_path"] = getattr(model.config, "_name_or_path", "") or "(model object)"
        self.config, _ = load_config("orpo", {"data": {"train": "(dataset passed to ORPOTrainer)"}}, overrides,
                                     plugins=get_plugin_manager(load_entrypoints=False, plugins=[alignkit_orpo]))
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("ORPOTrainer needs `processing_class` (the tokenizer) when `model` is an object")
            processing_class = load_tokenizer(self.config.model)
        if isinstance(model, str):  # loaded as alignkit loads it (causal or seq2seq, with model_init_kwargs)
            model = load_model(self.config.model, processing_class, self.config.train.seed)
        if peft_config is not None:
            model = apply_peft(model, peft_config)

        self.state, self.control = TrainerState(), TrainerControl()
        self.optimizer, self.lr_scheduler = optimizers
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        self.hp_search_backend, self.is_in_train = None, False
        default = [DefaultFlowCallback, PrinterCallback if self.args.disable_tqdm else ProgressCallback]
        self.callback_handler = CallbackHandler(default + list(callbacks or []), model, processing_class,
                                                self.optimizer, self.lr_scheduler)
        self._flow = TrainerFlow(self)
        method = alignkit_orpo.METHOD
        if data_collator is not None:
            method = dataclasses.replace(method, formatter=self._with_collator(method.formatter, data_collator))
        self.pm = get_plugin_manager(plugins=[self._flow])
        self.engine = Engine(self.config, method, self.pm, model=model, tokenizer=processing_class,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, schedule=self._flow,
                             optimizer=self.create_optimizer,
                             lr_scheduler=lambda opt, num_training_steps: self.create_scheduler(num_training_steps,
                                                                                                opt))
        self.engine.load()  # TRL's trainer has its model, tokenizer and formatter from the start
        self.model, self.processing_class = self.engine.model, self.engine.tokenizer
        self.callback_handler.model = self.model
        self.loss, self.formatter = self.engine.loss, self.engine.formatter
        self.data_collator = data_collator or self.formatter.collate
        self._raw = {"train": train_dataset, "eval": eval_dataset}
        self._formatted: dict[int, tuple] = {}  # id(raw dataset) -> (raw, tokenized)
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        self.label_pad_token_id, self.padding_value = self.args.label_pad_token_id, self.formatter.pad_id
        self.is_encoder_decoder, self.beta = self.formatter.is_encoder_decoder, self.args.beta
        a = self.args  # TRL's ORPOTrainer attributes, set as TRL sets them
        self.max_length, self.max_prompt_length = a.max_length, a.max_prompt_length
        self.truncation_mode = a.truncation_mode
        self.max_completion_length, self.generate_during_eval = a.max_completion_length, a.generate_during_eval
        self.use_dpo_data_collator, self.model_init = data_collator is None, model_init
        self.aux_loss_enabled = bool(getattr(self.model.config, "output_router_logits", False))
        self.aux_loss_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        self.pad_token_id = processing_class.pad_token_id
        self.decoder_start_token_id = getattr(self.model.config, "decoder_start_token_id", None)
        if self.args.push_to_hub:
            self.init_hf_repo()

    def _with_collator(self, formatter_cls, collator: Callable):
        """The ORPO formatter, collating with the user's TRL-style collator (per-side keys, TRL's layout)."""
        to_trl, to_alignkit = self._trl_features, self._alignkit_batch

        class WithCollator(formatter_cls):
            def collate(self, features):
                return to_alignkit(collator([to_trl(f) for f in features]))

        return WithCollator

    # ---- data -------------------------------------------------------------------------------------------

    def _tokenized(self, ds):
        """The formatted (tokenized) rows of `ds`; rows already tokenized by this trainer come back as they are."""
        if ds is None or _TOKENIZED in ds.column_names:
            return ds
        if id(ds) not in self._formatted:
            self._formatted[id(ds)] = (ds, prepare_dataset(ds, self.formatter, "dataset passed to ORPOTrainer")[0])
        return self._formatted[id(ds)][1]

    def _raw_of(self, ds):
        """The raw rows behind rows this trainer tokenized (the engine formats raw rows itself)."""
        for raw, tokenized in self._formatted.values():
            if tokenized is ds:
                return raw
        return ds

    @property
    def train_dataset(self):
        return self._tokenized(self._raw["train"])

    @property
    def eval_dataset(self):
        return self._tokenized(self._raw["eval"])

    @property
    def checkpoint_root(self) -> Path:
        return self.engine.checkpoint_root

    # ---- running ---------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs) -> TrainOutput:
        if trial is not None:
            self.hyperparameter_search()
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        if resume_from_checkpoint is True:
            found = sorted(self.checkpoint_root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                           if p.name.split("-")[-1].isdigit() else -1)
            if not found:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            resume_from_checkpoint = str(found[-1])
        self.engine.config.train.resume_from_checkpoint = (str(resume_from_checkpoint) if resume_from_checkpoint
                                                           else None)
        start, self.is_in_train = time.time(), True
        try:
            self.engine.train()
        finally:
            self.is_in_train = False
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        metrics = self._flow.end_of_training(start, self._num_train_samples())
        self.log(metrics)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _num_train_samples(self) -> int:
        """Trainer's count: max_steps x the total batch, or the examples x num_train_epochs."""
        if self.args.max_steps > 0:
            total_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return self.args.max_steps * total_batch * self.args.world_size
        report = self.engine.state.data.get("train")
        return int((report.kept if report else len(self.train_dataset)) * self.args.num_train_epochs)

    def _load_best_model(self) -> None:
        path = Path(self.state.best_model_checkpoint)
        if path.is_dir():
            self.engine.accelerator.load_state(str(path))

    def evaluate(self, eval_dataset: datasets.Dataset | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The engine's eval metrics (plus compute_metrics), with Trainer's runtime fields; logged as a row."""
        start = time.time()
        raw = self._raw_of(eval_dataset) if eval_dataset is not None else None
        metrics = self.engine.evaluate(raw)
        n = len(self._tokenized(raw if raw is not None else self._raw["eval"] or self._raw["train"]))
        if self.compute_metrics is not None:
            loop = self.evaluation_loop(self.engine.eval_batches(), "Evaluation", metric_key_prefix="eval")
            metrics.update({k: v for k, v in loop.metrics.items() if k not in metrics})
        metrics = {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in metrics.items()}
        loss_key = f"{metric_key_prefix}_loss"
        speed = speed_metrics(metric_key_prefix, start, num_samples=n,
                              num_steps=math.ceil(n / self.args.per_device_eval_batch_size))
        metrics = {loss_key: metrics[loss_key], **speed, **metrics}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def predict(self, test_dataset: datasets.Dataset, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """Per-example (chosen, rejected) log-probabilities as predictions (what compute_metrics sees), the
        loss, and Trainer's runtime fields; nothing is logged."""
        start = time.time()
        ds = self._tokenized(test_dataset)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.engine.collate_fn)
        out = self.evaluation_loop(loader, "Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        loss_key = f"{metric_key_prefix}_loss"
        extra = {k: v for k, v in out.metrics.items() if k.removeprefix(f"{metric_key_prefix}_") not in self._loss_keys}
        metrics = {loss_key: out.metrics[loss_key], **extra,
                   **speed_metrics(metric_key_prefix, start, num_samples=len(ds), num_steps=len(loader))}
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=out.predictions, label_ids=np.asarray(out.label_ids), metrics=metrics)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Model (or adapter), tokenizer, model card and training_args.bin in output_dir; pushed when push_to_hub."""
        out = Path(output_dir or self.args.output_dir)
        self.engine.save_model(output_dir=out)
        if self.is_world_process_zero():
            self.engine.record(out / "training_args.bin")  # in the folder's manifest: alignkit's to replace
            torch.save(self.args, out / "training_args.bin")
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")
