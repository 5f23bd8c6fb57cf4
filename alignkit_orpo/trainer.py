"""ORPOTrainer with TRL v0.15.2's constructor and methods, running on alignkit's engine."""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import TrainerControl, TrainerState
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction, TrainOutput

from alignkit import hookimpl, load_config, pad_right, shifted_token_logps
from alignkit.engine import Engine
from alignkit.plugins import get_plugin_manager
from alignkit_orpo.loss import odds_ratio_terms
from alignkit_orpo.trl_config import ORPOConfig


class _Callbacks:
    """Calls transformers TrainerCallback objects from alignkit's lifecycle hooks."""

    def __init__(self, callbacks: list[TrainerCallback], args: ORPOConfig) -> None:
        self.callbacks, self.args = callbacks, args
        self.state, self.control = TrainerState(), TrainerControl()

    def _call(self, event: str, run, **kwargs) -> None:
        self.state.global_step, self.state.max_steps, self.state.epoch = run.step, run.max_steps, run.epoch
        self.state.is_world_process_zero = run.is_main_process
        for cb in self.callbacks:
            getattr(cb, event)(self.args, self.state, self.control, model=run.model, **kwargs)

    @hookimpl
    def on_train_start(self, run):
        self._call("on_train_begin", run)

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self._call("on_step_end", run)

    @hookimpl
    def on_log(self, run, step, logs):
        self.state.log_history.append({**logs, "step": step})
        self._call("on_log", run, logs=logs)

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        self.state.log_history.append({**metrics, "step": step})
        self._call("on_evaluate", run, metrics=metrics)

    @hookimpl
    def on_save(self, run, step, path):
        self._call("on_save", run)

    @hookimpl
    def on_train_end(self, run, metrics):
        self._call("on_train_end", run)


class ORPOTrainer:
    """TRL's ORPOTrainer surface on alignkit's engine, ORPO formatter and ORPO loss."""

    def __init__(self, model: PreTrainedModel | torch.nn.Module | str | None = None, args: ORPOConfig | None = None,
                 data_collator: Callable | None = None, train_dataset: datasets.Dataset | None = None,
                 eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
                 processing_class=None, model_init: Callable[[], PreTrainedModel] | None = None,
                 callbacks: list[TrainerCallback] | None = None, optimizers: tuple = (None, None),
                 preprocess_logits_for_metrics: Callable | None = None, peft_config: dict | None = None,
                 compute_metrics: Callable[[EvalPrediction], dict] | None = None) -> None:
        import alignkit_orpo  # this plugin's own module (imported here: it imports this one)

        self.args = args or ORPOConfig(output_dir="trainer_output")
        overrides = self.args.to_alignkit()
        if model is None:
            if model_init is None:
                raise ValueError("ORPOTrainer needs `model` (a PreTrainedModel or a name) or `model_init`")
            model = model_init()
        if isinstance(model, str):  # loaded by alignkit (causal or seq2seq, with model_init_kwargs)
            overrides["model.name_or_path"], model = model, None
        elif processing_class is None:
            raise ValueError("ORPOTrainer needs `processing_class` (the tokenizer) when `model` is an object")
        if isinstance(eval_dataset, dict):
            raise ValueError("alignkit evaluates one eval_dataset; pass a single datasets.Dataset")
        if model is not None:
            overrides.setdefault("model.name_or_path", getattr(model.config, "_name_or_path", "") or "(model object)")
        self.config, _ = load_config("orpo", {"data": {"train": "(dataset passed to ORPOTrainer)"}}, overrides,
                                     plugins=get_plugin_manager(load_entrypoints=False, plugins=[alignkit_orpo]))
        self.pm = get_plugin_manager(plugins=[_Callbacks(list(callbacks or []), self.args)])
        collate = (lambda feats: self._alignkit_batch(data_collator([self._trl_features(f) for f in feats]))) \
            if data_collator is not None else None
        self.engine = Engine(self.config, alignkit_orpo.METHOD, self.pm, model=model, tokenizer=processing_class,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
                             optimizers=optimizers, collate_fn=collate)
        self.model, self.processing_class = self.engine.model, self.engine.tokenizer
        self.loss, self.formatter = self.engine.loss, self.engine.formatter
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_metrics, self.preprocess_logits_for_metrics = compute_metrics, preprocess_logits_for_metrics
        self.label_pad_token_id, self.padding_value = self.args.label_pad_token_id, self.formatter.pad_id
        self.is_encoder_decoder, self.beta = self.formatter.is_encoder_decoder, self.args.beta
        self._stored: list[dict[str, float]] = []

    # ---- running ---------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        if resume_from_checkpoint:
            spec = "auto" if resume_from_checkpoint is True else str(resume_from_checkpoint)
            self.engine.config.train.resume_from_checkpoint = spec
        start = time.time()
        metrics = self.engine.train()
        metrics["train_runtime"] = time.time() - start
        return TrainOutput(self.engine.state.step, metrics.get("loss", float("nan")), metrics)

    def evaluate(self, eval_dataset: datasets.Dataset | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = self.engine.evaluate(eval_dataset)
        if self.compute_metrics is not None:
            loop = self.evaluation_loop(self.engine.eval_batches(), "Evaluation", metric_key_prefix="eval")
            metrics.update({k: v for k, v in loop.metrics.items() if k not in metrics})
        metrics = {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in metrics.items()}
        self.log(metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self.engine.save_model(output_dir=Path(output_dir) if output_dir else None)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        from alignkit.modelcard import model_card
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = model_card(self.config, self.engine.method, self._stored[-1] if self._stored else {}, tags)
        if model_name:
            card = card.replace(f"# {Path(self.config.train.output_dir).name}\n", f"# {model_name}\n", 1)
        if dataset_name:
            card = card.replace("library_name: transformers", f"library_name: transformers\ndatasets:\n- {dataset_name}", 1)
        Path(self.args.output_dir or "trainer_output").mkdir(parents=True, exist_ok=True)
        (Path(self.args.output_dir or "trainer_output") / "README.md").write_text(card)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Store logs; the engine has already written metrics.jsonl and told callbacks and trackers."""
        self._stored.append(dict(logs))

    # ---- the seed's building blocks, each a view of the formatter or the loss --------------------------

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
        metrics = {f"{metric_key_prefix}_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        predictions = np.concatenate(preds) if preds else None
        labels = np.zeros(n_samples)
        if self.compute_metrics is not None and predictions is not None:
            extra = self.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        return EvalLoopOutput(predictions=predictions, label_ids=labels, metrics=metrics, num_samples=n_samples)

