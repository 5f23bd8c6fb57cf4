"""DPO (arXiv 2305.18290) and every loss type of TRL 1.16's DPOTrainer (alignkit_dpo.losses) on the summed answer
log-probs of [chosen; rejected] rows (alignkit.blocks.logps): loss lists with weights (MPO), LD-DPO's `ld_alpha`, WPO's
`use_weighting`, f-DPO's divergences, TR-DPO's reference sync. It also serves `online-dpo` (alignkit_dpo.online)."""

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

import alignkit
from alignkit.blocks.demo import demo_defaults
from alignkit.blocks.logps import LogpsOptions, SequenceScorer, TokenScorer, count_weights, pair_metrics
from alignkit.formatters.packing import model_inputs
from alignkit_dpo.formatter import DPOFormatter
from alignkit_dpo.losses import F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSSES, SMOOTHED, SORTED, Pair


class DPOConfig(LogpsOptions):
    name: str = "dpo"
    beta: float = Field(0.1, gt=0, description="Temperature of the implicit reward (deviation from the reference); "
                        "IPO's regularization tau.")
    loss_type: list[str] = Field(["sigmoid"], description="Loss type, or a list of them summed with loss_weights "
                                 f"(MPO): {', '.join(LOSSES)}.")
    loss_weights: list[float] | None = Field(None, description="Weight of each loss type (default: 1 each).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Label-flip probability of robust and aot, "
                                   "EXO's epsilon (read by those loss types only).")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO: weight of the answer tokens past the "
                                   "shorter answer's length (null: 1, plain DPO).")
    f_divergence_type: Literal[tuple(F_DIVERGENCES)] = Field(
        "reverse_kl", description="f-DPO divergence (reverse_kl is DPO); others only with "
        f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}.")
    f_alpha_divergence_coef: float = Field(0.5, description="alpha of f_divergence_type=alpha_divergence.")
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP's temperature (loss_type discopop).")
    use_weighting: bool = Field(False, description="WPO: weight each pair by its answers' length-normalised "
                                "probabilities under the policy.")
    precompute_ref_log_probs: bool = Field(False, description="Compute the reference log-probs once before training.")
    sync_ref_model: bool = Field(False, description="TR-DPO: mix the policy into the reference every "
                                 "ref_model_sync_steps steps.")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="TR-DPO: reference <- alpha * policy + "
                                         "(1 - alpha) * reference.")
    ref_model_sync_steps: int = Field(512, gt=0, description="TR-DPO: optimizer steps between reference syncs.")
    disable_dropout: bool = Field(True, description="Set p=0 on every Dropout module (LoRA's too), as TRL does.")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        values = [value] if isinstance(value, str) else value
        for v in values or ():
            if v not in LOSSES:
                raise ValueError(f"{v!r} is not a loss type of TRL 1.16's DPO; choose from {', '.join(LOSSES)}")
        if not values:
            raise ValueError(f"give at least one loss type: {', '.join(LOSSES)}")
        return values

    @model_validator(mode="after")
    def _consistent(self):
        types = set(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"method.loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} "
                             "loss types in method.loss_type; give one weight per loss type")
        if self.f_divergence_type != "reverse_kl" and not types <= F_DIVERGENCE_LOSSES:
            raise ValueError(f"method.f_divergence_type={self.f_divergence_type} works only with loss types "
                             f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}; got {', '.join(self.loss_type)}")
        if self.use_weighting and types & SORTED:
            raise ValueError("method.use_weighting: aot and aot_unpaired sort the pairs, so per-pair weights do not "
                             "apply; set method.use_weighting=false")
        if self.use_weighting and "sft" in types:  # TRL 1.16 fails there (an in-place product on an expanded mean)
            raise ValueError("method.use_weighting does not apply to loss_type sft (the chosen answers' token mean); "
                             "remove sft or set method.use_weighting=false")
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ValueError("method.label_smoothing must be > 0 for loss_type exo_pair (the EXO paper: 1e-3)")
        if self.label_smoothing and not types & SMOOTHED:
            raise ValueError(f"method.label_smoothing is read only by loss types {', '.join(sorted(SMOOTHED))} "
                             f"(TRL 1.16); got {', '.join(self.loss_type)}; for a conservative DPO use robust")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError("method.sync_ref_model updates the reference during training: it cannot be "
                             "precomputed; set method.precompute_ref_log_probs=false")
        return self


class DPOLoss(alignkit.Loss):
    eval_loss_per_batch = True  # eval_loss: the mean of per-batch losses, as TRL computes it
    needs_reference_model = True
    losses = LOSSES  # loss_type -> per-pair loss (a subclass may replace one, e.g. Online DPO's ipo)

    def __init__(self, config):
        super().__init__(config)
        self.scorer = SequenceScorer.from_config(config)
        self.scorer.fused = not set(config.loss_type) & SORTED  # aot sorts the batch: not a sum of per-pair terms
        self.tokens = TokenScorer.from_config(config) if config.use_weighting else None
        self.precompute_reference = config.precompute_ref_log_probs
        parts = list(zip(config.loss_type, config.loss_weights or [1.0] * len(config.loss_type)))
        self.pair_losses = [(t, w) for t, w in parts if t != "sft"]  # a type listed twice counts twice, as in TRL
        self.sft_weight = sum(w for t, w in parts if t == "sft") if "sft" in config.loss_type else None
        if config.sync_ref_model:
            self.reference_sync = (config.ref_model_sync_steps, config.ref_model_mixup_alpha)

    def prepare_model(self, model):
        self.scorer.prepare(model)
        if self.tokens is not None:
            self.tokens.prepare(model)

    def counts(self, batch):
        n = batch["input_ids"].shape[0] // 2
        counts = {"pairs": n}
        if self.sft_weight is not None:
            counts["chosen_tokens"] = int((batch["labels"][:n, 1:] != self.scorer.ignore).sum())
        return counts

    def _scored(self, batch):
        """(batch, nll targets): with ld_alpha, labels cut to the shorter answer's length, NLL targets all tokens."""
        if self.config.ld_alpha is None:
            return batch, None
        labels = batch["labels"]
        mask = labels[:, 1:] != self.scorer.ignore
        lengths = mask.sum(-1)
        shared = torch.minimum(*lengths.chunk(2)).repeat(2)
        tail = torch.cat([torch.zeros_like(labels[:, :1], dtype=torch.bool),
                          mask & (mask.cumsum(-1) > shared[:, None])], 1)
        return {**batch, "labels": labels.masked_fill(tail, self.scorer.ignore)}, labels

    def _answer_logps(self, s):
        """(ld-weighted summed log-probs, all answer tokens' log-probs, answer token counts) per row."""
        if self.config.ld_alpha is None:
            return s.logps, s.logps, s.tokens
        a = self.config.ld_alpha
        return (1 - a) * s.logps - a * s.nll, -s.nll, s.nll_tokens

    def reference(self, ref_model, batch):
        scored, targets = self._scored(batch)
        # group_size 2: the same forward as the policy's (pairs sharing their prompt), the same float rounding
        logps = self._answer_logps(self.scorer(ref_model, scored, nll_targets=targets, group_size=2)[0])[0]
        return dict(zip(("chosen", "rejected"), logps.chunk(2)))

    def _wpo_weights(self, model, batch):
        """WPO's per-pair weight [n] (no gradient): the product of both answers' exp(mean over answer tokens of
        log p(token) - log sum_v p(v)^2) under the policy."""
        with torch.no_grad():
            t = self.tokens(model, model_inputs(batch),
                            batch["labels"], stats=lambda logits, _: (torch.logsumexp(2 * logits.log_softmax(-1), -1),))
            weights = torch.exp(t.per_row(t.logps - t.extra[0]) / t.select.sum(-1).clamp(min=1))
        chosen, rejected = weights.chunk(2)
        return chosen * rejected

    def __call__(self, model, batch, ref, ctx=None):
        c = self.config
        wpo = self._wpo_weights(model, batch) if c.use_weighting else None

        def terms(s, groups):  # the chosen rows of `groups`, then their rejected rows
            m = len(groups)
            logps, full, tokens = self._answer_logps(s)
            pair = Pair(logps[:m], logps[m:], ref["chosen"][groups], ref["rejected"][groups], tokens[:m], tokens[m:],
                        c.f_divergence_type, c.f_alpha_divergence_coef)
            per_pair = sum(w * self.losses[t](pair, c) for t, w in self.pair_losses)
            out = {"pairs": (per_pair * (wpo[groups] if wpo is not None else 1)).sum()} if self.pair_losses else {}
            if self.sft_weight is not None:  # the chosen answers' token-mean NLL
                out["chosen_tokens"] = -self.sft_weight * full[:m].sum()
            return out

        scored, targets = self._scored(batch)
        s, _, summed = self.scorer(model, scored, nll_targets=targets, terms=terms, group_size=2,
                                   weights=count_weights(self.counts(batch), ctx))
        chosen, rejected = self._answer_logps(s)[0].chunk(2)
        metrics = pair_metrics(c.beta * (chosen - ref["chosen"]), c.beta * (rejected - ref["rejected"]), chosen,
                               rejected)
        return alignkit.LossOutput(terms=summed, metrics=metrics)


def full_weights_for_sync(config):
    if config.method.sync_ref_model and config.model.peft is not None:  # as TRL: no reference model to mix into
        raise alignkit.ConfigError("method.sync_ref_model mixes the policy into a separate reference model, which "
                                   "needs full fine-tuning; remove model.peft or set method.sync_ref_model=false")


DPO = alignkit.Method(
    name="dpo", config=DPOConfig, formatter=DPOFormatter, loss=DPOLoss, defaults={"train.learning_rate": 1e-6},
    description="Direct Preference Optimization and TRL 1.16's DPO loss family, against a frozen reference.",
    demo_data="sort", demo_defaults=demo_defaults(), progress_metrics=("rewards/accuracies",),
    validate=full_weights_for_sync,
    citation="@article{rafailov2023dpo, title={Direct Preference Optimization: Your Language Model is Secretly a "
             "Reward Model}, journal={arXiv:2305.18290}, year={2023}}",
)
from alignkit_dpo.online import ONLINE_DPO  # noqa: E402 (it builds on DPOConfig and DPOLoss above)

register_methods = alignkit.registers(DPO, ONLINE_DPO)
