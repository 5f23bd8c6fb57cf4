"""Log-probs of sampled completions at the sampling temperature (logits / temperature, as the sampler saw them),
through the core's TokenScorer: one forward over prompt + completion, the head only at the counted completion
tokens, in chunks, never holding [rows, T, vocab] logits."""

import torch

from alignkit.blocks.logps import TokenScorer


def completion_inputs(batch: dict, ignore: int = -100) -> tuple[dict, torch.Tensor]:
    """(model inputs, labels) of left-padded prompts + right-padded completions: the labels are the counted
    completion tokens, `ignore` elsewhere."""
    prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
    inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
              "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)}
    counted = completion_ids.masked_fill(~batch["completion_mask"].bool(), ignore)
    return inputs, torch.cat([torch.full_like(prompt_ids, ignore), counted], 1)


def token_logps(model: torch.nn.Module, batch: dict, temperature: float, chunk_size: int) -> torch.Tensor:
    """log p(completion token) [B, C] at `temperature`, 0 where masked (float32, no gradient expected)."""
    s = TokenScorer(chunk_size, temperature=temperature)(model, *completion_inputs(batch))
    return s.per_token()[:, batch["prompt_ids"].shape[1] - 1:]
