"""Per-token log-probs (and entropies) of sampled completions at the sampling temperature (logits / temperature,
as the sampler saw them), through the core's TokenScorer (alignkit.blocks.logps): the model runs once on prompt +
completion and its head only at the counted completion tokens, in chunks, never holding [rows, T, vocab] logits."""

import torch

from alignkit.blocks.logps import TokenScorer, TokenScores


def completion_inputs(batch: dict, ignore: int = -100) -> tuple[dict, torch.Tensor]:
    """(model inputs, labels) of left-padded prompts + right-padded completions: the labels are the counted
    completion tokens, `ignore` elsewhere."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
              "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)}
    counted = completion_ids.masked_fill(~batch["completion_mask"].bool(), ignore)
    return inputs, torch.cat([torch.full_like(prompt_ids, ignore), counted], 1)


def per_completion_token(scores: TokenScores, values_N: torch.Tensor, batch: dict) -> torch.Tensor:
    """Values [N] of the counted completion tokens laid out as [B, C], 0 where masked."""
    return scores.per_token(values_N)[:, batch["prompt_ids"].shape[1] - 1:]


def completion_logps(model: torch.nn.Module, batch: dict, temperature: float, chunk_size: int,
                     scorer: TokenScorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token) [B, C] (float32, differentiable) and entropy [B, C] (no grad); 0 where masked."""
    s = (scorer or TokenScorer(chunk_size, temperature=temperature))(model, *completion_inputs(batch))
    return per_completion_token(s, s.logps, batch), per_completion_token(s, s.entropy, batch)
