"""The ORPO objective (arXiv 2403.07691): NLL on the chosen rows minus beta * log sigma(log odds ratio)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit import Loss, LossOutput, log1mexp, shifted_token_logps
from alignkit.blocks.dropout import disable_dropout
from alignkit.blocks.lmhead import LMHead
from alignkit.blocks.logps import SequenceScorer, count_weights
from alignkit.formatters.vision import vision_inputs
from alignkit.plugin.loss import at_least_fp32


def odds_ratio_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float):
    """Per-pair ORPO quantities from mean token log-probs [B]: (-beta*log sigma, log_odds, log sigma).

    log odds(y|x) = log p - log(1 - p) with p = exp(mean log-prob), computed in float32 stably.
    """
    lc, lr = at_least_fp32(chosen_logps), at_least_fp32(rejected_logps)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    log_sigma = F.logsigmoid(log_odds)
    return -beta * log_sigma, log_odds, log_sigma


class ORPOLoss(Loss):
    """Runs one forward over [chosen; rejected] rows and returns the NLL and odds-ratio terms.

    The chunked path (default) never materialises the logits: see alignkit.blocks.logps. The plain path
    takes the model's full [2B, T, V] logits, as TRL does; both compute the same numbers.
    """

    eval_loss_per_batch = True  # eval_loss: the mean of per-batch losses, as TRL computes it
    #: router_aux_loss_coef when the model returns a MoE load-balancing loss, else None
    aux_loss_coef: float | None = None
    scorer: SequenceScorer | None = None

    @property
    def head(self) -> LMHead | None:
        """The split-off LM head of the chunked path; None runs the plain path."""
        return self.scorer.head if self.scorer is not None else None

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)
        if getattr(model.config, "output_router_logits", False):
            self.aux_loss_coef = model.config.router_aux_loss_coef
        self.scorer = SequenceScorer.from_config(self.config)
        self.scorer.prepare(model)

    def _nll_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Targets of the NLL on the chosen rows: every real token (sequence) or the answer (completion).
        An encoder-decoder's labels hold the answer alone."""
        n = batch["input_ids"].shape[0] // 2
        if self.config.nll_scope == "completion" or "decoder_input_ids" in batch:
            return batch["labels"][:n]
        # Padding is excluded by the attention mask, not by id, so an EOS equal to the pad id still trains.
        return batch["input_ids"][:n].masked_fill(batch["attention_mask"][:n] == 0, self.config.label_pad_token_id)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        targets = self._nll_targets(batch)[:, 1 if "decoder_input_ids" not in batch else 0:]
        return {"nll_tokens": int((targets != self.config.label_pad_token_id).sum()),
                "pairs": batch["input_ids"].shape[0] // 2, "batches": 1}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> "ORPOForward":
        """One forward over [chosen; rejected] rows: mean completion log-probs, NLL sum and count, logits means."""
        if self.head is not None:  # None for encoder-decoder models (LMHead.of)
            return self.forward_chunked(model, batch)
        return self.forward_plain(model, batch)

    def forward_chunked(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> "ORPOForward":
        """The LM head only at the positions a term reads, in chunks (alignkit.blocks.logps)."""
        return self._chunked(model, batch, fused=False)[0]

    def _chunked(self, model, batch, fused: bool, ctx=None) -> "tuple[ORPOForward, dict | None]":
        n = batch["input_ids"].shape[0] // 2
        nll_targets = torch.full_like(batch["labels"], self.config.label_pad_token_id)
        nll_targets[:n] = self._nll_targets(batch)
        beta = self.config.beta

        def terms(s, groups):  # s: the chosen rows of `groups`, then their rejected rows
            m = len(groups)
            or_loss, _, _ = odds_ratio_terms(s.logps[:m] / s.tokens[:m], s.logps[m:] / s.tokens[m:], beta)
            return {"nll_tokens": s.nll[:m].sum(), "pairs": or_loss.sum()}

        s, aux, summed = self.scorer(model, batch, nll_targets, aux_loss=self.aux_loss_coef is not None,
                                     terms=terms if fused else None, group_size=2,
                                     weights=count_weights(self.counts(batch), ctx))
        seq_logps_B = s.logps / s.tokens
        # logits/* average every position [:, :-1] over the whole vocabulary
        logits_means = (s.rows(torch.arange(n)).logits_mean(), s.rows(torch.arange(n, 2 * n)).logits_mean())
        return ORPOForward(None, seq_logps_B[:n], seq_logps_B[n:], s.nll[:n].sum(), s.nll_tokens[:n].sum(), aux,
                           None, logits_means), summed

    def forward_plain(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> "ORPOForward":
        """The model's full logits [2B, T, V]: log-softmax over all of them (TRL's way; keeps `logits`)."""
        n, ignore = batch["input_ids"].shape[0] // 2, self.config.label_pad_token_id
        seq2seq = "decoder_input_ids" in batch
        extra = {"output_router_logits": True} if self.aux_loss_coef is not None else {}
        if seq2seq:
            extra["decoder_input_ids"] = batch["decoder_input_ids"]
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                        **vision_inputs(batch), **extra)
        logits_BTV = outputs.logits
        nll_logps_BT, nll_mask_BT = shifted_token_logps(logits_BTV[:n], self._nll_targets(batch), ignore,
                                                        shift=not seq2seq)
        token_logps_BT, mask_BT = shifted_token_logps(logits_BTV, batch["labels"], ignore, shift=not seq2seq)
        seq_logps_B = token_logps_BT.sum(-1) / mask_BT.sum(-1)
        # logits/* average the positions that predict something: all but the last of a decoder-only row
        scored_BTV = logits_BTV if seq2seq else logits_BTV[:, :-1]
        with torch.no_grad():
            logits_means = (at_least_fp32(scored_BTV[:n]).mean(), at_least_fp32(scored_BTV[n:]).mean())
        return ORPOForward(logits_BTV, seq_logps_B[:n], seq_logps_B[n:], -nll_logps_BT.sum(), nll_mask_BT.sum(),
                           outputs.aux_loss if self.aux_loss_coef is not None else None, scored_BTV, logits_means)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx=None) -> LossOutput:
        if self.head is None:
            return self.output(self.forward_plain(model, batch))
        return self.output(*self._chunked(model, batch, fused=True, ctx=ctx))

    def output(self, f: "ORPOForward", terms: dict | None = None) -> LossOutput:
        """The summed loss terms (unless given: the fused head computed them) and the eleven metrics."""
        beta = self.config.beta
        or_loss_B, log_odds_B, log_sigma_B = odds_ratio_terms(f.chosen_logps, f.rejected_logps, beta)
        terms = dict(terms) if terms is not None else {"nll_tokens": f.nll_sum, "pairs": or_loss_B.sum()}
        if f.aux_loss is not None:
            terms["batches"] = self.aux_loss_coef * f.aux_loss
        with torch.no_grad():
            chosen_rewards, rejected_rewards = beta * f.chosen_logps, beta * f.rejected_logps
            metrics = {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": f.chosen_logps.mean(),
                "logps/rejected": f.rejected_logps.mean(),
                "logits/chosen": f.logits_means[0],
                "logits/rejected": f.logits_means[1],
                "nll_loss": f.nll_sum / f.nll_count,
                "log_odds_ratio": log_sigma_B.mean(),
                "log_odds_chosen": log_odds_B.mean(),
            }
        return LossOutput(terms=terms, metrics=metrics)


@dataclass
class ORPOForward:
    """What one forward pass gives: mean log-probs [B] per side, the chosen NLL, the logits/* means, and
    (plain path only) the logits [2B, T, V]."""

    logits: torch.Tensor | None
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_sum: torch.Tensor
    nll_count: torch.Tensor
    aux_loss: torch.Tensor | None
    scored_logits: torch.Tensor | None  # plain path: the positions logits/* average, [2B, T-1, V] or [2B, T, V]
    logits_means: tuple[torch.Tensor, torch.Tensor] = ()  # (logits/chosen, logits/rejected)
