"""ORPOTrainer: TRL v0.15.2's constructor, its documented methods and the transformers.Trainer surface TRL
users touch, on alignkit's engine with the ORPO formatter and loss (the maths lives there only)."""

import time
from collections.abc import Callable

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_utils import EvalPrediction, PredictionOutput, speed_metrics

from alignkit.trainer_facade import FacadeTrainer
from alignkit_orpo.trl.args import ORPOConfig
from alignkit_orpo.trl.v0152 import V0152Methods


class ORPOTrainer(V0152Methods, FacadeTrainer):
    """TRL's ORPOTrainer surface on alignkit's engine, ORPO formatter and ORPO loss."""

    requires_train_dataset = False  # TRL v0.15.2 builds an ORPOTrainer without one (evaluate only)
    tokenized_column = "chosen_input_ids"  # a column only formatted (tokenized) preference rows have

    def __init__(self, model: PreTrainedModel | torch.nn.Module | str | None = None, args: ORPOConfig | None = None,
                 data_collator: Callable | None = None, train_dataset: datasets.Dataset | None = None,
                 eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
                 processing_class=None, model_init: Callable[[], PreTrainedModel] | None = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Callable | None = None, peft_config=None,
                 compute_metrics: Callable[[EvalPrediction], dict] | None = None) -> None:
        import alignkit_orpo  # this plugin's own module (imported here: it imports this one lazily)

        self.args = args or ORPOConfig(output_dir="trainer_output")
        if processing_class is None and model is not None and not isinstance(model, str):
            raise ValueError("ORPOTrainer needs `processing_class` (the tokenizer) when `model` is an object")
        wrapper = (lambda cls: self._with_collator(cls, data_collator)) if data_collator is not None else None
        self._start("orpo", [alignkit_orpo], model, self.args, train_dataset, eval_dataset, processing_class,
                    model_init, callbacks, optimizers, peft_config, formatter_wrapper=wrapper)
        self.data_collator = data_collator or self.formatter.collate
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        self.label_pad_token_id, self.padding_value = self.args.label_pad_token_id, self.formatter.pad_id
        self.is_encoder_decoder, self.beta = self.formatter.is_encoder_decoder, self.args.beta
        a = self.args  # TRL's ORPOTrainer attributes, set as TRL sets them
        self.max_length, self.max_prompt_length = a.max_length, a.max_prompt_length
        self.truncation_mode = a.truncation_mode
        self.max_completion_length, self.generate_during_eval = a.max_completion_length, a.generate_during_eval
        self.use_dpo_data_collator = data_collator is None
        self.aux_loss_enabled = bool(getattr(self.model.config, "output_router_logits", False))
        self.aux_loss_coef = getattr(self.model.config, "router_aux_loss_coef", 0.0)
        self.pad_token_id = self.processing_class.pad_token_id
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
