"""Batched sampling whose every row is reproducible on its own.

All completions of a call are sampled in one left-padded `generate` (KV cache), yet each row's tokens depend only on
its own seed: a row draws its randomness from its own generator, one uniform per vocabulary entry per step, and
picks argmax(logits / T + Gumbel noise) among the tokens top-k / top-p keep (the Gumbel-max trick: a sample of
softmax(logits / T) restricted to those tokens). So a completion is the same whether its prompt is sampled alone,
in a batch of 4 or 16, on one process or two, before or after a resume: the only thing batching can change is the
rounding of the logits, which moves a sample only where two tokens' noisy scores tie to the last bit.

Text-only prompts of a decoder-only model are sampled by `decode`, a KV-cached loop of our own instead of
transformers' `generate`: each distinct prompt is run once and its cache shared by its repeats (a group's samples),
and a row that sampled its stop token leaves the batch (so the last steps run on the few rows still going, where
`generate` keeps computing every finished row). It applies the same processors in the same order and draws the
same noise, so it picks the same tokens as `generate` would. Prompts with images (their features go with the ids)
and encoder-decoder models take `generate`.
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

    def keep(self, rows: list[int]) -> None:
        """Only `rows` (indices into the current ones) go on sampling: their generators, in that order."""
        self.generators = [self.generators[i] for i in rows]

    #: rows whose float64 noise is drawn at once (16 x 151,936 x 8 bytes: 19 MB, whatever the batch)
    BLOCK_ROWS = 16

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # each row's vocabulary of uniforms in float64, drawn block by block into one buffer and turned into
        # -log(-log(u)) in place (the same numbers as the out-of-place formula), added to the row's float32 scores
        rows, vocab = len(self.generators), scores.shape[-1]
        out = torch.empty(rows, vocab, dtype=torch.float32, device=scores.device)
        buffer = torch.empty(min(rows, self.BLOCK_ROWS), vocab, dtype=torch.float64)
        for start in range(0, rows, self.BLOCK_ROWS):
            gumbel = buffer[:len(self.generators[start:start + self.BLOCK_ROWS])]
            for row, g in zip(gumbel, self.generators[start:start + self.BLOCK_ROWS]):
                torch.rand(vocab, generator=g, dtype=torch.float64, out=row)
            gumbel.clamp_(1e-300, 1 - 1e-16).log_().neg_().log_().neg_()
            stop = start + len(gumbel)
            out[start:stop] = gumbel.to(device=scores.device, dtype=torch.float32).add_(scores[start:stop].float())
        return out  # (a + b == b + a exactly)


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
    if not model_inputs and not getattr(model.config, "is_encoder_decoder", False):
        return decode(model, rows, processors, max_new_tokens, stop_token_ids, pad_token_id)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(stop_token_ids),
                              pad_token_id=pad_token_id, use_cache=True)
    sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                               logits_processor=processors, **model_inputs)
    return [_until_stop(row[ids.shape[1]:].tolist(), stop_token_ids) for row in sequences]


def decode(model, rows: list[list[int]], processors: LogitsProcessorList, max_new_tokens: int,
           stop_token_ids: list[int], pad_token_id: int) -> list[list[int]]:
    """`generate`'s greedy search over the processors' scores (see the module docstring), with each distinct prompt
    prefilled once and finished rows dropped from the batch; one completion per row, ending at its stop token."""
    distinct: dict[tuple, int] = {}
    order = [distinct.setdefault(tuple(r), len(distinct)) for r in rows]
    device = next(model.parameters()).device
    ids, mask = left_pad([list(r) for r in distinct], pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, expand, name = _cache_of(out), torch.tensor(order, device=device), _cache_argument(model)
    cache.reorder_cache(expand)  # each row's copy of its prompt's keys and values
    logits, mask, position = out.logits[expand, -1], mask[expand], positions[expand, -1]
    live = torch.arange(len(rows), device=device)  # the row each batch entry samples
    stop = torch.tensor(list(stop_token_ids), device=device)
    noise = next((p for p in processors if isinstance(p, GumbelNoise)), None)
    completions: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        scores = processors(ids, logits.float())  # the processors read the scores only, not the ids
        tokens = scores.argmax(-1)
        for row, token in zip(live.tolist(), tokens.tolist()):
            completions[row].append(token)
        going = ~torch.isin(tokens, stop)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # finished rows leave the batch, their cache and their noise generators with them
            keep = going.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            live, tokens, mask, position = live[keep], tokens[keep], mask[keep], position[keep]
            if noise is not None:
                noise.keep(keep.tolist())
        mask, position = torch.cat([mask, mask.new_ones(len(live), 1)], 1), position + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                    **{name: cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
    return completions


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers 5.2x on), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _until_stop(tokens: list[int], stop: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens
