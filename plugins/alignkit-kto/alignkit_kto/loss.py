"""The KTO objective (Ethayarajh et al., arXiv 2402.01306) and its unpaired APO-zero variant.

Each example is a (prompt, completion) with a boolean label (desirable or not). With r = beta * (log
pi(y|x) - log pi_ref(y|x)) and z the batch KL estimate (beta * z is the reference point):

    desirable:    w_d * (1 - sigmoid(beta * (logratio - z)))
    undesirable:  w_u * (1 - sigmoid(beta * (z - logratio)))

z is the mean over the batch of log pi(y'|x) - log pi_ref(y'|x) on mismatched pairs (each prompt with
another example's completion, fixed when the data is formatted), detached, averaged over processes
(ctx.reduce) and clamped at 0. apo_zero_unpaired uses 1 - sigmoid(beta * logratio) and
sigmoid(beta * logratio), with no KL term. Metrics are TRL 1.16 KTOTrainer's names.
"""

from dataclasses import dataclass

import torch

from alignkit import Loss, LossOutput
from alignkit.blocks.dropout import disable_dropout
from alignkit.blocks.fusedhead import fused_row_terms
from alignkit.blocks.lmhead import LMHead, final_hidden_states, require_head
from alignkit.blocks.logps import TokenScorer, entropy_of
from alignkit.formatters.vision import vision_inputs
from alignkit_kto.pairing import kl_pairs


@dataclass
class CompletionStats:
    """Per row [B]: summed completion log-probs (differentiable when the model is), completion tokens,
    and (details only, no grad) the sums over completion positions of the vocab-mean logit and the entropy."""

    logps: torch.Tensor
    tokens: torch.Tensor
    logits_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None


def vocab_mean(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor]:
    """The vocab-mean logit of each position (no grad), as the logits/* metrics read it."""
    return (logits.mean(-1),)


def kto_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, kl: torch.Tensor, beta: float,
               loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted per-example losses of the desirable and the undesirable examples."""
    if loss_type == "kto":
        return 1 - torch.sigmoid(beta * (chosen_logratios - kl)), 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    return 1 - torch.sigmoid(beta * chosen_logratios), torch.sigmoid(beta * rejected_logratios)


def _reduce_sum(ctx, values: torch.Tensor) -> torch.Tensor:
    """Sum over processes (no grad); a loss called outside the engine (ctx None) is one process."""
    return values if ctx is None else ctx.reduce(values, op="sum")


class KTOLoss(Loss):
    """Policy forward on the completions (with grad) and, for `kto`, on the KL pairs (without)."""

    needs_reference_model = True
    #: the KL estimate and the batch margin are reduced over processes in every forward
    collective = True
    #: TRL's num_tokens: the input tokens (prompt + completion, not the KL pairs) trained on so far
    running_totals = {"num_tokens": "input_tokens"}

    def __init__(self, config) -> None:
        super().__init__(config)
        self.scorer = TokenScorer.from_config(config)  # completion log-probs of any model (its head found once)
        self._checked: set[int] = set()
        if config.sync_ref_model:  # the engine mixes the policy into the reference every k steps
            self.reference_sync = (config.ref_model_sync_steps, config.ref_model_mixup_alpha)

    @property
    def precompute_reference(self) -> bool:
        return self.config.precompute_ref_log_probs

    @property
    def ignore(self) -> int:
        return getattr(self.config, "label_pad_token_id", -100)

    def prepare_model(self, model: torch.nn.Module) -> None:
        if self.config.disable_dropout:
            disable_dropout(model)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"examples": batch["label"].shape[0], "input_tokens": int(batch["attention_mask"].sum())}

    # ---- log-probs ---------------------------------------------------------------------------------

    def _head(self, model: torch.nn.Module) -> LMHead | None:
        """The split-off LM head of `model` (the chunked path), or None for the plain path."""
        return self.scorer.head_of(model)

    def stats(self, model: torch.nn.Module, batch: dict, prefix: str, details: bool = False) -> CompletionStats:
        """Completion statistics of the `{prefix}input_ids` rows: the completions (prefix "") or the KL pairs ("KL_"),
        through the shared TokenScorer (alignkit.blocks.logps); a row's images (its prompt's) go with either."""
        inputs = {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"],
                  **vision_inputs(batch)}
        s = self.scorer(model, inputs, batch[f"{prefix}labels"], stats=vocab_mean if details else None)
        stats = CompletionStats(s.per_row(), s.select.sum(-1))
        if details:
            stats.logits_sum, stats.entropy_sum = s.per_row(s.extra[0] if s.extra else s.entropy), s.per_row(s.entropy)
        return stats

    def _check(self, model, head: LMHead, ids, mask, images: dict) -> None:
        """Once per head: the split-off head reproduces the model's own logits."""
        if id(head) in self._checked:
            return
        if not images:  # one row is enough (a batch's image inputs may not split by row)
            ids, mask = ids[:1], mask[:1]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1,
                        use_cache=False, **images)
        require_head(head, out, self._checked)

    def reference(self, ref_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference log-probs of each completion and, for `kto`, of each example's KL pair."""
        out = {"logps": self.stats(ref_model, batch, "").logps}
        if self.config.uses_kl:
            out["KL_logps"] = self.stats(ref_model, kl_pairs(batch, self.config), "KL_").logps
        return out

    # ---- the loss ----------------------------------------------------------------------------------

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], ref: dict, ctx=None) -> LossOutput:
        c = self.config
        desirable = batch["label"].bool()
        kl, kl_sum = self._kl(model, batch, ref, ctx)
        head = self._head(model)
        if head is not None and torch.is_grad_enabled():  # training on the fused head
            total, policy = self._fused(model, head, batch, ref, desirable, kl)
        else:
            policy = self.stats(model, batch, "", details=True)
            total = self._weighted(policy.logps - ref["logps"].to(policy.logps), desirable, kl)
        with torch.no_grad():
            rewards = c.beta * (policy.logps.detach() - ref["logps"].to(policy.logps))
            summed = torch.cat([kl_sum, _reduce_sum(ctx, torch.stack([
                rewards[desirable].sum(), desirable.sum().float(), rewards[~desirable].sum(),
                (~desirable).sum().float()]))])
        return LossOutput(terms={"examples": total}, metrics=self._metrics(policy, rewards, desirable, kl, summed, ctx))

    def _kl(self, model, batch, ref: dict, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch KL estimate z, the summed local estimates [1]): computed first, as TRL does, without gradient,
        averaged over processes and clamped at 0; zero for apo_zero_unpaired."""
        c = self.config
        with torch.no_grad():
            local_kl = torch.zeros((), device=batch["label"].device)
            if c.uses_kl:
                kl_logps = self.stats(model, kl_pairs(batch, self.config), "KL_").logps
                local_kl = (kl_logps - ref["KL_logps"].to(kl_logps)).mean()
            kl_sum = _reduce_sum(ctx, local_kl.float().reshape(1))
            processes = 1 if ctx is None else ctx.num_processes
            return ((kl_sum[0] / processes).clamp(min=0) if c.uses_kl else kl_sum.new_zeros(())), kl_sum

    def _weighted(self, logratios, desirable, kl) -> torch.Tensor:
        """The summed, weighted losses of these examples."""
        c = self.config
        chosen, rejected = kto_losses(logratios[desirable], logratios[~desirable], kl, c.beta, c.loss_type)
        return c.desirable_weight * chosen.sum() + c.undesirable_weight * rejected.sum()

    def _fused(self, model, head: LMHead, batch, ref: dict, desirable, kl) -> tuple[torch.Tensor, CompletionStats]:
        """(the summed loss, the policy's completion stats) on the fused head
        (alignkit.blocks.fusedhead.fused_row_terms): whole rows chunk by chunk, each chunk's head gradients computed in
        the forward."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        images = vision_inputs(batch)
        self._check(model, head, ids, mask, images)
        _, hidden_BTH = final_hidden_states(model, ids, mask, **images)
        targets_BT = labels[:, 1:]
        select_BT = targets_BT != self.ignore
        rows_N = torch.arange(len(ids), device=ids.device)[:, None].expand_as(select_BT)[select_BT]
        ref_logps = ref["logps"]
        total, logps, extra = fused_row_terms(
            head, hidden_BTH[:, :-1][select_BT], targets_BT[select_BT], rows_N, len(ids), self.config.logits_chunk_size,
            lambda sums, rows: self._weighted(sums - ref_logps[rows].to(sums), desirable[rows], kl),
            stats=lambda logits, targets: (logits.mean(-1), entropy_of(logits)))
        with torch.no_grad():
            def per_row(values_N):
                return values_N.new_zeros(select_BT.shape).masked_scatter(select_BT, values_N).sum(-1)

            means, entropies = (per_row(x) for x in extra) if extra else (logps.new_zeros(len(ids)),) * 2
        return total, CompletionStats(logps, select_BT.sum(-1), means, entropies)

    def _metrics(self, policy: CompletionStats, rewards, desirable, kl, summed, ctx) -> dict:
        """TRL's metrics as exact (sum, count) pairs; `kl` and `rewards/margins` are per-batch values (already
        global), counted once per batch, on the main process."""
        main = ctx is None or ctx.process_index == 0
        tokens = policy.tokens
        metrics = {}
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            metrics[f"rewards/{side}"] = (rewards[rows].sum(), rows.sum())
            metrics[f"logps/{side}"] = (policy.logps.detach()[rows].sum(), rows.sum())
            metrics[f"logits/{side}"] = (policy.logits_sum[rows].sum(), tokens[rows].sum())
        # counted only where the batch has both kinds of example (no device sync: the count is a tensor)
        counted = ((summed[2] > 0) & (summed[4] > 0)).float() * main
        margin = summed[1] / summed[2].clamp(min=1) - summed[3] / summed[4].clamp(min=1)
        metrics["rewards/margins"] = (margin * counted, counted)
        metrics["kl"] = (kl * main, float(main))
        metrics["entropy"] = (policy.entropy_sum.sum(), tokens.sum())
        return metrics
