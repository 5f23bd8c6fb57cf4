"""Per-token log-probs (and entropies) of sampled completions, without [rows, T, vocab] logits.

The model runs once on prompt + completion and returns its final hidden states (alignkit.blocks.lmhead);
the LM head then runs only at the completion tokens that count, in chunks, at the sampling temperature
(logits / temperature, as the sampler saw them). `completion_logps` checkpoints its chunks (the rollout's old
log-probs, the reference); the loss in training runs the fused head instead (GRPOLoss, no recompute).
"""

import torch
from torch.utils.checkpoint import checkpoint

from alignkit.blocks.lmhead import LMHead, final_hidden_states
from alignkit.plugin.loss import at_least_fp32


def _chunk(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = at_least_fp32(head.logits(hidden)) / temperature
    logz = torch.logsumexp(logits, -1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        entropy = logz - (probs * logits).sum(-1)
    return logps, entropy


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP-style wrapper (`.module`), else the model itself."""
    return getattr(model, "module", model)


def completion_hidden(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final hidden states [B, P + C, H], those [N, H] that predict the N counted completion tokens, the tokens [N])."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    _, hidden = final_hidden_states(model, input_ids, attention)
    hidden_BCH = hidden[:, prompt_ids.shape[1] - 1:-1]  # the position before each completion token predicts it
    mask_BC = batch["completion_mask"].bool()
    return hidden, hidden_BCH[mask_BC], completion_ids[mask_BC]


def entropy_of(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor]:
    """The entropy of each position's distribution (logits already at the sampling temperature)."""
    logz = torch.logsumexp(logits, -1)
    return (logz - (torch.softmax(logits, -1) * logits).sum(-1),)


def completion_logps(model: torch.nn.Module, batch: dict, temperature: float, chunk_size: int,
                     head: LMHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token) [B, C] (float32, differentiable) and entropy [B, C] (no grad); 0 where masked.

    `batch` holds left-padded `prompt_ids`/`prompt_mask` and right-padded `completion_ids`/`completion_mask`.
    """
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    mask_BC = batch["completion_mask"].bool()
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    if head is None:
        head, why = LMHead.of(unwrap(model))
    if head is None:  # no separable head: the model's own logits at the completion positions
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False,
                       logits_to_keep=completion_ids.shape[1] + 1).logits[:, :-1]
        logits = at_least_fp32(logits) / temperature
        logz = torch.logsumexp(logits, -1)
        logps = logits.gather(-1, completion_ids[..., None]).squeeze(-1) - logz
        with torch.no_grad():
            entropy = logz - (torch.softmax(logits, -1) * logits).sum(-1)
        return logps * mask_BC, entropy * mask_BC
    hidden, h, t = completion_hidden(model, batch)
    logps, entropies = [], []
    for hc, tc in zip(h.split(chunk_size), t.split(chunk_size)):
        if torch.is_grad_enabled() and hc.requires_grad:
            lp, ent = checkpoint(_chunk, head, hc, tc, temperature, use_reentrant=False)
        else:
            lp, ent = _chunk(head, hc, tc, temperature)
        logps.append(lp)
        entropies.append(ent)
    if not logps:  # nothing counts: zeros still connected to the graph, so backward runs
        out = hidden.new_zeros(mask_BC.shape, dtype=torch.float32) + hidden.sum() * 0
        return out, out.detach().clone()
    out = hidden.new_zeros(mask_BC.shape, dtype=logps[0].dtype)
    logps_BC = out.masked_scatter(mask_BC, torch.cat(logps))
    entropy_BC = out.detach().clone().masked_scatter(mask_BC, torch.cat(entropies))
    return logps_BC, entropy_BC
