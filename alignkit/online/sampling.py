"""Batched sampling whose every row is reproducible on its own.

All completions of a call are sampled in one left-padded `generate` (KV cache), yet each row's tokens depend only on
its own seed: a row draws its randomness from its own generator, one uniform per vocabulary entry per step, and
picks argmax(logits / T + Gumbel noise) among the tokens top-k / top-p keep (the Gumbel-max trick: a sample of
softmax(logits / T) restricted to those tokens). So a completion is the same whether its prompt is sampled alone,
in a batch of 4 or 16, on one process or two, before or after a resume: the only thing batching can change is the
rounding of the logits, which moves a sample only where two tokens' noisy scores tie to the last bit.
"""

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class GumbelNoise(LogitsProcessor):
    """Adds each row's own Gumbel noise to its scores; greedy decoding then samples (see the module docstring)."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]  # on the CPU: the same on every device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # [rows, vocab] float64 per step (155 MB at 128 rows x 151,936): drawn into one buffer and turned into
        # -log(-log(u)) in place, no temporary of that size (the same numbers as the out-of-place formula)
        gumbel = torch.empty(len(self.generators), scores.shape[-1], dtype=torch.float64)
        for row, g in zip(gumbel, self.generators):
            torch.rand(scores.shape[-1], generator=g, dtype=torch.float64, out=row)
        gumbel.clamp_(1e-300, 1 - 1e-16).log_().neg_().log_().neg_()
        return gumbel.to(device=scores.device, dtype=torch.float32).add_(scores.float())  # a + b == b + a exactly


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def sample(model, rows: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float, top_p: float,
           top_k: int, stop_token_ids: list[int], pad_token_id: int, suppress=(), **model_inputs) -> list[list[int]]:
    """One completion per row of `rows` (prompt token ids), row i sampled from `seeds[i]` alone (greedy when
    temperature is 0); each completion ends at its first stop token, included. `suppress`: token ids never sampled
    (a vision-language model's image token); `model_inputs` (its `pixel_values`, ... for these rows) go to `generate`
    with the ids."""
    ids, mask = left_pad(rows, pad_token_id, next(model.parameters()).device)
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(list(suppress), ids.device)] if suppress else [])
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(GumbelNoise(seeds))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_token_ids),
                              pad_token_id=pad_token_id, use_cache=True)
    sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                               logits_processor=processors, **model_inputs)
    return [_until_stop(row[ids.shape[1]:].tolist(), stop_token_ids) for row in sequences]


def _until_stop(tokens: list[int], stop: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens
