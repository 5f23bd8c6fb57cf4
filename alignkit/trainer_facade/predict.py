"""compute_metrics for the TRL-style trainers whose predictions are the model's logits (several of TRL's trainers:
Trainer's prediction_step returns the logits and the batch's labels, or its input ids).

`LogitsEvaluation.evaluation_loop` runs the model over eval batches, hands `preprocess_logits_for_metrics(logits,
labels)` (or the logits) and the labels to `compute_metrics` as one EvalPrediction, concatenated over batches and
padded with -100 as Trainer does. The trainer's `evaluate()` adds its metrics; so does each evaluation during
training (TrainerFlow)."""

import numpy as np
import torch
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from alignkit.formatters.packing import model_inputs


class LogitsEvaluation:
    """Mixed into a FacadeTrainer subclass (needs `compute_metrics`, `preprocess_logits_for_metrics`, `engine`)."""

    #: the batch key Trainer's prediction_step returns as the labels (e.g. "input_ids"); None: the trainer has no
    #: label names (TRL's RewardTrainer), and Trainer then hands compute_metrics an empty tuple as the labels
    metric_labels: str | None = "labels"

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        model, preds, labels = self.engine.model, [], []
        preprocess = getattr(self, "preprocess_logits_for_metrics", None)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                logits = model(**model_inputs(batch), use_cache=False).logits
                label = batch[self.metric_labels] if self.metric_labels is not None else ()
                preds.append((preprocess(logits, label) if preprocess is not None else logits).float().cpu())
                if self.metric_labels is not None:
                    labels.append(label.cpu())
        model.train(was_training)
        predictions = _concat(preds)
        label_ids = _concat(labels) if self.metric_labels is not None else ()
        metrics = {}
        if self.compute_metrics is not None and predictions is not None:
            extra = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=label_ids))
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in extra.items()}
        return EvalLoopOutput(predictions=predictions, label_ids=label_ids, metrics=metrics,
                              num_samples=0 if predictions is None else len(predictions))


def _concat(tensors: list[torch.Tensor]) -> np.ndarray | None:
    """Batches concatenated along the first dimension, the second padded with -100 (Trainer's nested_concat)."""
    if not tensors:
        return None
    if tensors[0].dim() > 1:
        width = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]), value=-100)
                   for t in tensors]
    return torch.cat(tensors).numpy()
