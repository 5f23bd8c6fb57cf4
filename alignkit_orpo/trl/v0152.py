"""The methods TRL v0.15.2's ORPOTrainer documents, each a view of alignkit's ORPO formatter
or loss, so the maths stays in one place; plus compute_loss, prediction_step and store_metrics."""

from collections import defaultdict
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from alignkit import pad_right, shifted_token_logps
from alignkit_orpo.loss import odds_ratio_terms


class V0152Methods:
    """Needs `self.formatter`, `self.loss`, `self.engine`, `self.args`, `self.beta`, `self.is_encoder_decoder`."""

    _stored_metrics: defaultdict

    def build_tokenized_answer(self, prompt: str, answer: str) -> dict[str, list[int]]:
        prompt_ids, answer_ids = self.formatter.tokenize_answer(prompt, answer)
        return {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids),
                "input_ids": answer_ids, "attention_mask": [1] * len(answer_ids)}

    def tokenize_row(self, feature: dict, model: PreTrainedModel | None = None) -> dict[str, list[int]]:
        return self._trl_features(self.formatter.format(feature).features)

    def _trl_features(self, f: dict) -> dict[str, list[int]]:
        """Formatted features in TRL's layout, attention masks included (what TRL's collators expect)."""
        out = {"prompt_input_ids": f["prompt_input_ids"], "prompt_attention_mask": [1] * len(f["prompt_input_ids"])}
        if self.is_encoder_decoder:
            return {**out, "chosen_labels": f["chosen_labels"], "rejected_labels": f["rejected_labels"]}
        for side in ("chosen", "rejected"):
            ids = f[f"{side}_input_ids"]
            out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                        f"{side}_labels": f[f"{side}_labels"]})
        return out

    @staticmethod
    def concatenated_inputs(batch: dict, is_encoder_decoder: bool = False, label_pad_token_id: int = -100,
                            padding_value: int = 0, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        rows = [list(map(int, r)) for r in [*batch["chosen_input_ids"], *batch["rejected_input_ids"]]]
        masks = [list(map(int, r)) for r in [*batch["chosen_attention_mask"], *batch["rejected_attention_mask"]]]
        labels = [list(map(int, r)) for r in [*batch["chosen_labels"], *batch["rejected_labels"]]]
        width = max(len(r) for r in rows)
        out = {"concatenated_input_ids": pad_right(rows, padding_value, width),
               "concatenated_attention_mask": pad_right(masks, 0, width),
               "concatenated_labels": pad_right(labels, label_pad_token_id, width)}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def _alignkit_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        if "input_ids" in batch:
            return batch
        c = self.concatenated_inputs(batch, label_pad_token_id=self.label_pad_token_id,
                                     padding_value=self.padding_value)
        return {"input_ids": c["concatenated_input_ids"], "attention_mask": c["concatenated_attention_mask"],
                "labels": c["concatenated_labels"]}

    def concatenated_forward(self, model: torch.nn.Module, batch: dict) -> tuple:
        """(chosen_logps, rejected_logps, chosen_logits, rejected_logits, chosen_nll_loss[, aux_loss])."""
        f = self.loss.forward_plain(model, self._alignkit_batch(batch))
        n = f.chosen_logps.shape[0]
        out = (f.chosen_logps, f.rejected_logps, f.scored_logits[:n], f.scored_logits[n:], f.nll_sum / f.nll_count)
        return out + (f.aux_loss,) if f.aux_loss is not None else out

    @staticmethod
    def get_batch_logps(logits: torch.FloatTensor, labels: torch.LongTensor, average_log_prob: bool = False,
                        label_pad_token_id: int = -100, is_encoder_decoder: bool = False) -> torch.FloatTensor:
        if logits.shape[:-1] != labels.shape:
            raise ValueError("Logits (batch and sequence length dim) and labels must have the same shape.")
        logps, mask = shifted_token_logps(logits, labels, label_pad_token_id, shift=not is_encoder_decoder)
        return logps.sum(-1) / mask.sum(-1) if average_log_prob else logps.sum(-1)

    def odds_ratio_loss(self, policy_chosen_logps: torch.FloatTensor, policy_rejected_logps: torch.FloatTensor):
        """(losses, chosen_rewards, rejected_rewards, mean log sigma(log odds), mean log odds)."""
        losses, log_odds, log_sigma = odds_ratio_terms(policy_chosen_logps, policy_rejected_logps, self.beta)
        chosen_rewards = (self.beta * policy_chosen_logps).detach()
        rejected_rewards = (self.beta * policy_rejected_logps).detach()
        return losses, chosen_rewards, rejected_rewards, log_sigma.mean(), log_odds.mean()

    def get_batch_loss_metrics(self, model, batch: dict, train_eval: Literal["train", "eval"] = "train"):
        """(loss, metrics) of one batch, metrics named as TRL logs them (`eval_` prefix for eval)."""
        batch = self._alignkit_batch(batch)
        out = self.loss(model, batch)
        prefix = "eval_" if train_eval == "eval" else ""
        return out.normalized(self.loss.counts(batch)), {f"{prefix}{k}": v.item() for k, v in out.metrics.items()}

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The ORPO loss of a batch (train metrics stored for the next log row)."""
        loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval="train")
        self.store_metrics(metrics, train_eval="train")
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """(loss, [mean chosen logit, mean rejected logit], zeros): what TRL 0.15.2 meant to return (its own
        version fails on the float metrics); eval metrics are stored for the next eval row."""
        if ignore_keys is None:
            ignore_keys = list(getattr(getattr(model, "config", None), "keys_to_ignore_at_inference", []) or [])
        with torch.no_grad():
            loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval="eval")
        self.store_metrics(metrics, train_eval="eval")
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = torch.tensor([v for k, v in metrics.items() if k in ("eval_logits/chosen", "eval_logits/rejected")
                               and k not in ignore_keys])
        return loss.detach(), logits, torch.zeros(logits.shape[0])

    def store_metrics(self, metrics: dict[str, float], train_eval: Literal["train", "eval"] = "train") -> None:
        """Kept until the next log row of that kind, which adds their means (as TRL's log does)."""
        for key, value in metrics.items():
            self._stored_metrics[train_eval][key].append(value)

    def generate_from_model(self, model, batch: dict) -> list[str]:
        """Sampled completions (decoded, without the prompt) for the batch's prompts."""
        from alignkit_orpo.generation import sample_completions

        prompts = batch["prompt_input_ids"]
        return sample_completions(model, self.processing_class, [list(map(int, p)) for p in prompts],
                                  self.args.max_length)

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Per-batch metrics averaged over batches, plus compute_metrics on (chosen, rejected) log-probs or on
        what preprocess_logits_for_metrics makes of the logits."""
        model, sums, preds, n_batches, n_samples = self.engine.model, {}, [], 0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                batch = self._alignkit_batch(batch)
                f = (self.loss.forward_plain if self.preprocess_logits_for_metrics is not None
                     else self.loss.forward)(model, batch)
                out = self.loss.output(f)
                for k, v in {"loss": out.normalized(self.loss.counts(batch)), **out.metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if self.preprocess_logits_for_metrics is not None:
                    preds.append(self.preprocess_logits_for_metrics(f.logits, batch["labels"]).cpu().numpy())
                else:
                    preds.append(torch.stack([f.chosen_logps, f.rejected_logps], -1).float().cpu().numpy())
                n_batches += 1
                n_samples += f.chosen_logps.shape[0]
        model.train(was_training)
        self._loss_keys = set(sums)  # the loss's own metrics (predict reports only the loss of them)
        metrics = {f"{metric_key_prefix}_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        predictions = np.concatenate(preds) if preds else None
        labels = np.zeros(n_samples)
        if self.compute_metrics is not None and predictions is not None:
            extra = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        return EvalLoopOutput(predictions=predictions, label_ids=labels, metrics=metrics, num_samples=n_samples)

