"""Sampled completions as online losses score them: prompts left-padded, completions right-padded, and the
per-token log-probs (and entropies) of the completion tokens at the sampling temperature (logits / temperature, as
the sampler saw them), through the core's TokenScorer (alignkit.blocks.logps): the model runs once on prompt +
completion and its head only at the counted completion tokens, in chunks, never holding [rows, T, vocab] logits."""

import torch

from alignkit.blocks.logps import TokenScorer, TokenScores
from alignkit.formatters.vision import vision_inputs


def pad_rows(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [len(rows), longest] of token lists padded with `value` on the left or the right (at least one
    column, for a batch of empty completions)."""
    width = max(1, max(map(len, rows)))
    ids = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def completion_inputs(batch: dict, ignore: int = -100) -> tuple[dict, torch.Tensor]:
    """(model inputs, labels) of left-padded prompts + right-padded completions (`prompt_ids`, `prompt_mask`,
    `completion_ids`, `completion_mask`): the labels are the counted completion tokens, `ignore` elsewhere. The model
    attends to `completion_attention_mask` where the batch has one (multi-turn rollouts: the environment's tokens are
    read but not counted), else to the counted tokens. A vision-language model's image inputs in the batch
    (`pixel_values`, ..., one entry per row) go with them."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    attended = batch.get("completion_attention_mask", batch["completion_mask"])  # multi-turn: env tokens too
    inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
              "attention_mask": torch.cat([batch["prompt_mask"], attended], 1), **vision_inputs(batch)}
    counted = completion_ids.masked_fill(~batch["completion_mask"].bool(), ignore)
    return inputs, torch.cat([torch.full_like(prompt_ids, ignore), counted], 1)


def per_completion_token(scores: TokenScores, values_N: torch.Tensor, batch: dict) -> torch.Tensor:
    """Values [N] of the counted completion tokens laid out as [B, C], 0 where masked."""
    return scores.per_token(values_N)[:, batch["prompt_ids"].shape[1] - 1:]


def completion_logps(model: torch.nn.Module, batch: dict, temperature: float, chunk_size: int,
                     scorer: TokenScorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token) [B, C] (float32, differentiable) and entropy [B, C] (no grad); 0 where masked."""
    scorer = scorer or TokenScorer(chunk_size, temperature=temperature, share_prefix=True)
    s = scorer(model, *completion_inputs(batch))
    return per_completion_token(s, s.logps, batch), per_completion_token(s, s.entropy, batch)
