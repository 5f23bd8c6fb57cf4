"""Batched sampling that stays deterministic (issue 22, item 1): every completion depends only on (the run's seed,
the call's seed, its prompt, its index), not on how many rows share a generate call, which other prompts are in it,
or their lengths; and the Gumbel-max sampler draws from softmax(logits / T) restricted by top-k / top-p."""

import functools

import pytest
import torch

from alignkit.online.generation import TransformersBackend
from alignkit.online.sampling import sample
from alignkit.testing import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
MODEL = tiny_model(seed=3).eval()
PEAKED = tiny_model(seed=3).eval()  # logits scaled by 8: a next-token distribution with perplexity about 25
with torch.no_grad():
    PEAKED.model.norm.weight.fill_(8.0)
PROMPTS = [TOK(f"sort: {i} {(7 * i) % 10} {'1 ' * (i % 4)}=")["input_ids"] for i in range(16)]  # unequal lengths


def backend(rows_per_call: int) -> TransformersBackend:
    return TransformersBackend(MODEL, lambda m: m, TOK.pad_token_id, max_batch_rows=rows_per_call)


def sampled(rows_per_call: int, prompts=PROMPTS, n=4, seed=11, **kw):
    args = dict(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=[TOK.eos_token_id])
    args.update(kw)
    return backend(rows_per_call).generate(prompts, n, seed=seed, **args)


def test_the_same_completions_whatever_the_batch_size():
    one, four, sixteen, all_rows = (sampled(rows) for rows in (1, 4, 16, 64))
    assert one == four == sixteen == all_rows
    assert len({tuple(c) for group in one for c in group}) > 40  # real samples, not one repeated answer


def test_a_prompts_completions_do_not_depend_on_the_other_prompts_of_the_call():
    every = sampled(64)
    assert sampled(64, PROMPTS[5:9]) == every[5:9]
    assert sampled(64, PROMPTS[::-1]) == every[::-1]
    assert sampled(64, seed=12) != every


def test_a_repeated_prompt_gets_fresh_samples_and_a_split_call_gives_the_same_ones():
    twice = sampled(64, [PROMPTS[0], PROMPTS[0]])
    assert twice[0] != twice[1]
    assert sampled(4, [PROMPTS[0], PROMPTS[0]], top_k=20, top_p=0.9) == \
        sampled(64, [PROMPTS[0], PROMPTS[0]], top_k=20, top_p=0.9)


def first_token_distribution(temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """The next-token distribution after PROMPTS[0] as transformers' own sampling warpers define it."""
    with torch.no_grad():
        logits = PEAKED(torch.tensor([PROMPTS[0]])).logits[0, -1].double() / temperature
    if top_k:
        logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
    probs = logits.softmax(-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        drop = ordered.cumsum(-1) - ordered > top_p  # keep the smallest prefix whose mass reaches top_p
        probs[order[drop]] = 0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 8, 1.0),
                                                              (1.0, 0, 0.5)])
def test_gumbel_max_samples_the_softmax_of_the_kept_tokens(temperature, top_k, top_p):
    rows = 6000
    firsts = sample(PEAKED, [PROMPTS[0]] * rows, list(range(rows)), 1, temperature, top_p, top_k,
                    [TOK.eos_token_id], TOK.pad_token_id)
    counts = torch.bincount(torch.tensor([c[0] for c in firsts]), minlength=MODEL.config.vocab_size).double()
    want = first_token_distribution(temperature, top_k, top_p)
    assert set(counts.nonzero().flatten().tolist()) <= set(want.nonzero().flatten().tolist())  # only kept tokens
    sigma = (want * (1 - want) / rows).sqrt()
    assert ((counts / rows - want).abs() <= 5 * sigma + 1e-12).all()


def test_temperature_zero_is_greedy():
    [[greedy]] = sampled(64, PROMPTS[:1], n=1, temperature=0.0)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = MODEL.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                              eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)[0, ids.shape[1]:]
    assert greedy == want.tolist()[:len(greedy)] and len(greedy) >= 1


def generate_path(model, rows, seeds, max_new_tokens, temperature, top_p, top_k, stop, suppress=()):
    """What `sample` did before its own decode loop: transformers' generate over the same processors."""
    from transformers import GenerationConfig, LogitsProcessorList, SuppressTokensLogitsProcessor

    from alignkit.online.sampling import (
        GumbelNoise,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        _until_stop,
        left_pad,
    )

    ids, mask = left_pad(rows, TOK.pad_token_id, "cpu")
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(list(suppress), "cpu")] if suppress else [])
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        processors += [TopKLogitsWarper(top_k)] if top_k else []
        processors += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        processors.append(GumbelNoise(seeds))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                              pad_token_id=TOK.pad_token_id, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    return [_until_stop(r[ids.shape[1]:].tolist(), stop) for r in out]


@pytest.mark.parametrize("temperature,top_k,top_p,suppress", [(1.0, 0, 1.0, ()), (0.7, 5, 0.9, ()),
                                                               (0.0, 0, 1.0, ()), (1.0, 0, 1.0, (5, 6))])
def test_the_decode_loop_picks_what_generate_picks(temperature, top_k, top_p, suppress):
    """Repeated prompts prefilled once, finished rows dropped from the batch: the same tokens as transformers'
    generate over the same processors and noise, rows stopping at different steps (some at the length cap)."""
    rows = [PROMPTS[i % 5] for i in range(5) for _ in range(3)] + [PROMPTS[7]]
    seeds = list(range(100, 100 + len(rows)))
    stop = [TOK.eos_token_id] + list(range(0, len(TOK), 9))  # a ninth of the vocabulary ends a completion
    lengths = set()
    for model in (MODEL, PEAKED):
        with torch.no_grad():
            ours = sample(model, rows, seeds, 10, temperature, top_p, top_k, stop, TOK.pad_token_id, suppress=suppress)
        assert ours == generate_path(model, rows, seeds, 10, temperature, top_p, top_k, stop, suppress)
        lengths |= {len(c) for c in ours}
    if temperature > 0:  # rows stopped at different steps, some ran to the cap
        assert len(lengths) >= 3 and 10 in lengths, lengths


def test_the_decode_loop_prefills_each_distinct_prompt_once(monkeypatch):
    """8 samples of each of 2 prompts: the first forward sees 2 rows, not 16."""
    widths = []
    forward = type(MODEL).forward

    @functools.wraps(forward)
    def spy(self, input_ids=None, **kw):
        widths.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(MODEL), "forward", spy)
    rows = [PROMPTS[0]] * 8 + [PROMPTS[3]] * 8
    with torch.no_grad():
        sample(MODEL, rows, list(range(16)), 6, 1.0, 1.0, 0, [TOK.eos_token_id], TOK.pad_token_id)
    assert widths[0][0] == 2 and all(w[1] == 1 for w in widths[1:])  # prefill 2 prompts, then one token a step
    assert widths[-1][0] <= 16
