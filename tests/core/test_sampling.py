"""Batched sampling that stays deterministic (issue 22, item 1): every completion depends only on (the run's seed,
the call's seed, its prompt, its index), not on how many rows share a generate call, which other prompts are in it,
or their lengths; and the Gumbel-max sampler draws from softmax(logits / T) restricted by top-k / top-p."""

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
