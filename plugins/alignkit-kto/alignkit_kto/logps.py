"""Per-sequence completion statistics of a causal LM: summed log-probs, and (for the policy's metrics)
the vocabulary-mean logit and the entropy at each completion position.

The chunked path runs the LM head only at completion positions, in checkpointed chunks
(alignkit.blocks.lmhead), so no [rows, T, vocab] logits are ever held; the plain path takes the model's
full logits. Both compute the same numbers (a test checks). In training the loss runs the fused head
instead (KTOLoss._fused: whole rows per chunk, gradients computed in the forward, nothing recomputed).
"""

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from alignkit import shifted_token_logps
from alignkit.blocks.lmhead import LMHead, final_hidden_states
from alignkit.plugin.loss import at_least_fp32


@dataclass
class CompletionStats:
    """Per row [B]: summed completion log-probs (differentiable when the model is), completion tokens,
    and (details only, no grad) the sums over completion positions of the vocab-mean logit and the entropy."""

    logps: torch.Tensor
    tokens: torch.Tensor
    logits_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None


def _entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, from its log-sum-exp: lse - E_p[logit]."""
    return lse - (torch.softmax(logits, -1) * logits).sum(-1)


def mean_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocab-mean logit and the entropy of each position (no grad), as the metrics read them."""
    return logits.mean(-1), _entropy(logits, torch.logsumexp(logits, -1))


def _chunk(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor):
    logits = at_least_fp32(head.logits(hidden))
    lse = torch.logsumexp(logits, -1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    with torch.no_grad():
        return logps, logits.mean(-1), _entropy(logits, lse)


def _scored(head: LMHead, hidden_NH: torch.Tensor, targets_N: torch.Tensor, chunk_size: int):
    """log p(target), vocab-mean logit and entropy at each of N positions (the first with grad if hidden has)."""
    parts = []
    for h, t in zip(hidden_NH.split(chunk_size), targets_N.split(chunk_size)):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk(head, h, t))
    if not parts:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    return tuple(torch.cat(p) for p in zip(*parts))


def chunked_stats(model, head: LMHead, input_ids, attention_mask, labels, ignore: int, chunk_size: int,
                  details: bool) -> CompletionStats:
    """Completion statistics with the LM head run only at completion positions."""
    _, hidden_BTH = final_hidden_states(model, input_ids, attention_mask)
    targets_BT = labels[:, 1:]
    select_BT = targets_BT != ignore
    logps_N, means_N, entropy_N = _scored(head, hidden_BTH[:, :-1][select_BT], targets_BT[select_BT], chunk_size)
    stats = CompletionStats(per_row(select_BT, logps_N), select_BT.sum(-1))
    if details:
        stats.logits_sum, stats.entropy_sum = per_row(select_BT, means_N), per_row(select_BT, entropy_N)
    return stats


def per_row(select_BT: torch.Tensor, values_N: torch.Tensor) -> torch.Tensor:
    """Per-row sums [B] of values at the N selected positions (row-major, as `x_BT[select_BT]` lays them out)."""
    return values_N.new_zeros(select_BT.shape).masked_scatter(select_BT, values_N).sum(-1)


def plain_stats(model, input_ids, attention_mask, labels, ignore: int, details: bool) -> CompletionStats:
    """Completion statistics from the model's full logits."""
    logits_BTV = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps_BT, mask_BT = shifted_token_logps(logits_BTV, labels, ignore)
    stats = CompletionStats(logps_BT.sum(-1), mask_BT.sum(-1))
    if details:
        with torch.no_grad():
            scored = at_least_fp32(logits_BTV[:, :-1])
            entropy_BT = _entropy(scored, torch.logsumexp(scored, -1))
            stats.logits_sum = (scored.mean(-1) * mask_BT).sum(-1)
            stats.entropy_sum = (entropy_BT * mask_BT).sum(-1)
    return stats
