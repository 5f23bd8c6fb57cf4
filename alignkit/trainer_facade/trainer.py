"""FacadeTrainer: the method-independent half of a TRL-style trainer on alignkit's engine.

A plugin's `XTrainer(FacadeTrainer)` calls `self._start(method_name, plugins, ...)` from its TRL-shaped
constructor; this class builds the alignkit config from the TRL-style args (`args.to_alignkit()`), loads the
model and tokenizer as alignkit does, wires transformers' callbacks into the engine's loop (TrainerFlow) and
offers Trainer's train / evaluate / save_model / push_to_hub and state (TrainerSurface).
"""

import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DefaultFlowCallback, PrinterCallback, ProgressCallback
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState
from transformers.trainer_utils import TrainOutput, speed_metrics

from alignkit import Engine, apply_peft, get_plugin_manager, load_config, load_model, load_tokenizer, prepare_dataset
from alignkit.trainer_facade.flow import TrainerFlow
from alignkit.trainer_facade.surface import TrainerSurface


class FacadeTrainer(TrainerSurface):
    #: a column only rows this method's formatter produced have (rows that have it are not formatted again)
    tokenized_column: str | None = None
    #: the model tags TRL's trainer adds (model.add_model_tags), e.g. ["trl", METHOD_NAME]
    _tag_names: list[str] = []
    #: TRL 1.x's trainers refuse to start without a train_dataset
    requires_train_dataset: bool = True
    #: the summary row after training gets the means of the step metrics not logged yet (several of TRL 1.16's
    #: trainers' logs add them to every train row)
    summary_has_step_metrics: bool = False

    def _args(self, args, config_cls: type, default_output_dir: str):
        """`args` as `config_cls` (TRL converts a plain TrainingArguments the same way); a default one when None."""
        if args is None:
            return config_cls(output_dir=default_output_dir)
        if isinstance(args, config_cls):
            return args
        import dataclasses

        names = {f.name for f in dataclasses.fields(config_cls) if f.init}
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
        return config_cls(**given)

    @staticmethod
    def _model_name(model) -> str:
        return model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")

    def _ref_model_overrides(self, ref_model, model) -> dict:
        """A reference model object as alignkit's model.ref_name_or_path: the checkpoint it was loaded from."""
        if ref_model is None:
            return {}
        if ref_model is model:
            raise ValueError(f"{type(self).__name__}: `model` and `ref_model` cannot be the same object; pass "
                             "ref_model=None for a frozen copy of the model")
        path = ref_model if isinstance(ref_model, str) else getattr(ref_model.config, "_name_or_path", "")
        if not path:
            raise ValueError(f"{type(self).__name__}(ref_model=...): alignkit loads the reference itself; pass a "
                             "model loaded with from_pretrained (its name or folder), a name, or None")
        return {"model.ref_name_or_path": path}

    def _refuse(self, **given) -> None:
        """A ValueError for each constructor argument (name -> (value, reason)) alignkit cannot honour."""
        for name, (value, reason) in given.items():
            if value is not None:
                raise ValueError(f"{type(self).__name__}({name}=...) is not supported by alignkit: {reason}")

    def _start(self, method_name: str, plugins: list, model, args, train_dataset, eval_dataset, processing_class,
               model_init: Callable | None, callbacks, optimizers, peft_config, formatter_wrapper=None,
               overrides: dict | None = None) -> None:
        """Build the engine for `method_name` (registered by one of `plugins`) on the TRL-style `args`.
        `formatter_wrapper(formatter_cls) -> formatter_cls` lets a trainer collate with a user's collator."""
        name = type(self).__name__
        if args.save_strategy == "best" and args.metric_for_best_model is None:
            raise ValueError(f"{type(args).__name__}.metric_for_best_model must be set when save_strategy='best'")
        if train_dataset is None and self.requires_train_dataset:
            raise ValueError("`train_dataset` is required")
        _refuse_streaming_precompute(args, train_dataset, eval_dataset)
        train_dataset, eval_dataset = _finite(train_dataset), _finite(eval_dataset)
        self._eval_datasets = None
        if isinstance(eval_dataset, dict):  # Trainer evaluates each, as eval_<name>_<metric> (TrainerFlow)
            self._eval_datasets, eval_dataset = {k: _finite(v) for k, v in eval_dataset.items()}, None
        overrides = {**args.to_alignkit(), **(overrides or {}), "train.disable_tqdm": True, "train.plots": False,
                     "train.overwrite_output_dir": True, "train.checkpoint_dir": "."}  # Trainer's output_dir layout
        if model is None:
            if model_init is None:
                raise ValueError(f"{name} needs `model` (a PreTrainedModel or a name) or `model_init`")
            model = model_init()
        if isinstance(model, str):
            overrides["model.name_or_path"] = model
        else:
            overrides["model.name_or_path"] = getattr(model.config, "_name_or_path", "") or "(model object)"
        self.config, method = load_config(method_name, {"data": {"train": f"(dataset passed to {name})"}}, overrides,
                                          plugins=get_plugin_manager(load_entrypoints=False, plugins=list(plugins)))
        if processing_class is None:
            processing_class = load_tokenizer(self.config.model)
        _refuse_images_for_a_text_model(train_dataset, processing_class)
        if isinstance(model, str):  # loaded as alignkit loads it (the method's model kind, model_init_kwargs)
            model = load_model(self.config.model, processing_class, self.config.train.seed,
                               kind=method.model_kind, num_labels=method.num_labels)
        if getattr(args, "disable_dropout", False) and "disable_dropout" not in type(self.config.method).model_fields:
            from alignkit.blocks.dropout import disable_dropout

            disable_dropout(model)  # TRL's trainers do it to the model they are given when the method does not
        if peft_config is not None:
            model = apply_peft(model, peft_config)

        self.state, self.control = TrainerState(), TrainerControl()
        self.optimizer, self.lr_scheduler = optimizers
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        self.hp_search_backend, self.is_in_train, self.model_init = None, False, model_init
        default = [DefaultFlowCallback, PrinterCallback if args.disable_tqdm else ProgressCallback]
        self.callback_handler = CallbackHandler(default + list(callbacks or []), model, processing_class,
                                                self.optimizer, self.lr_scheduler)
        self._flow = TrainerFlow(self)
        if formatter_wrapper is not None:
            import dataclasses

            method = dataclasses.replace(method, formatter=formatter_wrapper(method.formatter))
        self.pm = get_plugin_manager(plugins=[self._flow, *[p for p in plugins if not hasattr(p, "METHOD")
                                                             and not hasattr(p, "register_methods")]])
        self.engine = Engine(self.config, method, self.pm, model=model, tokenizer=processing_class,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, schedule=self._flow,
                             optimizer=self.create_optimizer,
                             lr_scheduler=lambda opt, num_training_steps: self.create_scheduler(num_training_steps,
                                                                                                opt))
        self.engine.load()  # TRL's trainer has its model, tokenizer and formatter from the start
        self.model, self.processing_class = self.engine.model, self.engine.tokenizer
        self.callback_handler.model = self.model
        if self._tag_names and hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.loss, self.formatter = self.engine.loss, self.engine.formatter
        self._raw = {"train": train_dataset, "eval": eval_dataset}
        self._formatted: dict[tuple, tuple] = {}  # (id(raw dataset), split) -> (raw, tokenized)

    # ---- data -------------------------------------------------------------------------------------------

    def _tokenized(self, ds, split: str = "train"):
        """The formatted (tokenized) rows of `ds` (by the formatter of `split`: "train" or "eval"); rows already
        tokenized by this trainer come back as they are."""
        if ds is None or (self.tokenized_column and self.tokenized_column in ds.column_names):
            return ds
        if any(tokenized is ds for _, tokenized in self._formatted.values()):
            return ds
        if (id(ds), split) not in self._formatted:
            label = f"dataset passed to {type(self).__name__}"
            formatted = prepare_dataset(ds, self.formatter.for_split(split), label)[0]
            self._formatted[id(ds), split] = (ds, self._trl_view(formatted))
        return self._formatted[id(ds), split][1]

    def _trl_view(self, formatted):
        """The formatted rows as the trainer's train_dataset / eval_dataset show them: as they are by default; a
        trainer may add the columns TRL's own prepared rows have (the engine formats the raw rows itself)."""
        return formatted

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
        if self._eval_datasets is not None:  # a dict of them: each evaluated by evaluate()
            return {k: self._tokenized(v, "eval") for k, v in self._eval_datasets.items()}
        return self._tokenized(self._raw["eval"], "eval")

    @property
    def ref_model(self):
        """The frozen reference model the engine loaded (None for a method without one, or once precomputed)."""
        return getattr(self.engine.reference, "model", None)

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
        unlogged = self._flow.unlogged_means() if self.summary_has_step_metrics else {}  # in the log row only
        self.log(metrics := {**metrics, **unlogged})  # (log adds `epoch`, which Trainer's metrics keep)
        metrics = {k: v for k, v in metrics.items() if k not in unlogged}
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

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The engine's eval metrics (plus compute_metrics), with Trainer's runtime fields; logged as a row. A dict
        of datasets: each evaluated, its metrics prefixed `eval_<name>_`, as Trainer does."""
        _refuse_streaming_precompute(self.args, eval_dataset)
        given = [self._raw["eval"], *(self._eval_datasets or {}).values()]  # (their reference: computed up front)
        if eval_dataset is not None and not any(eval_dataset is ds for ds in given):
            self._refuse_late_precompute()
        eval_dataset = _finite(eval_dataset)
        if eval_dataset is None and self._eval_datasets is not None:
            eval_dataset = self._eval_datasets
        if isinstance(eval_dataset, dict):
            out = {}
            for key, ds in eval_dataset.items():
                out.update(self.evaluate(ds, ignore_keys, f"{metric_key_prefix}_{key}"))
            return out
        start = time.time()
        raw = self._raw_of(eval_dataset) if eval_dataset is not None else None
        metrics = self.engine.evaluate(raw)
        n = len(self._tokenized(raw if raw is not None else self._raw["eval"] or self._raw["train"], "eval"))
        if getattr(self, "compute_metrics", None) is not None:
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

    def _refuse_late_precompute(self) -> None:
        """TRL: with precompute_ref_log_probs and no ref_model (full fine-tuning) the reference is the model before
        training; once a step has run, a new dataset's reference log-probs cannot be computed."""
        if (getattr(self.args, "precompute_ref_log_probs", False) and not self.config.model.ref_name_or_path
                and not hasattr(self.model, "disable_adapter") and self.state.global_step > 0):
            raise ValueError(
                "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training has started, "
                "because `precompute_ref_log_probs=True` and no `ref_model` was provided (full fine-tuning). In this "
                "setup the reference model is not kept in memory, so it is only available before training. Provide "
                "this dataset as `eval_dataset` at initialization, pass an explicit `ref_model`, or set "
                "`precompute_ref_log_probs=False`.")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Model (or adapter), tokenizer, model card and training_args.bin in output_dir; pushed when push_to_hub."""
        out = Path(output_dir or self.args.output_dir)
        self.engine.save_model(output_dir=out)
        if self.is_world_process_zero():
            self.engine.record(out / "training_args.bin")  # in the folder's manifest: alignkit's to replace
            torch.save(self.args, out / "training_args.bin")
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs) -> None:
        from alignkit import model_card

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = model_card(self.config, self.engine.method, self.state.log_history[-1] if self.state.log_history else {},
                          tags)
        if model_name:
            card = card.replace(f"# {Path(self.config.train.output_dir).name}\n", f"# {model_name}\n", 1)
        if dataset_name:
            card = card.replace("library_name: transformers",
                                f"library_name: transformers\ndatasets:\n- {dataset_name}", 1)
        out = Path(self.args.output_dir or "trainer_output")
        out.mkdir(parents=True, exist_ok=True)
        self.engine.record(out / "README.md")  # in the folder's manifest: alignkit's to replace
        (out / "README.md").write_text(card)

    def end(self) -> None:
        """transformers >= 5.18's Trainer.end: finish the trackers (the engine closes its own after train())."""


def _refuse_images_for_a_text_model(train_dataset, processing_class) -> None:
    """TRL's refusal, before any work: rows with images (`image` / `images`) need a vision-language model (whose
    processing class is a processor)."""
    from alignkit.formatters.vision import processor_of

    if train_dataset is None or processor_of(processing_class) is not None or hasattr(processing_class,
                                                                                     "image_processor"):
        return
    first = next(iter(train_dataset), {})
    if first.get("image") is not None or first.get("images") is not None:
        raise ValueError("The dataset appears to be vision-related (contains 'image' or 'images' keys), but the "
                         "provided model does not seem to be a vision-language model. Please check your model and "
                         "dataset.")


def _refuse_streaming_precompute(args, *datasets_given) -> None:
    """TRL refuses precompute_ref_log_probs on an IterableDataset (the reference is scored once, over all rows)."""
    import datasets

    found = [d for ds in datasets_given for d in (ds.values() if isinstance(ds, dict) else [ds])
             if isinstance(d, datasets.IterableDataset)]
    if found and getattr(args, "precompute_ref_log_probs", False):
        raise ValueError("precompute_ref_log_probs=True is not supported with IterableDataset: the reference "
                         "log-probs are computed once over all rows; pass a datasets.Dataset or set "
                         "precompute_ref_log_probs=False")


def _finite(ds):
    """A (finite) IterableDataset, or a dict of them, as an in-memory datasets.Dataset: the engine reads its length."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        rows = list(ds)
        return datasets.Dataset.from_list(rows)
    if isinstance(ds, dict) and any(isinstance(v, datasets.IterableDataset) for v in ds.values()):
        return {k: _finite(v) for k, v in ds.items()}
    return ds
