"""The sampler's per-row Gumbel noise (alignkit.online.sampling, shared by RLOO and GRPO): drawn into one buffer and
transformed in place, the same numbers as the out-of-place formula, without the [rows, vocab] float64 temporaries."""

import torch
from torch.profiler import ProfilerActivity, profile

from alignkit.online.sampling import GumbelNoise

ROWS, VOCAB = 6, 5000


def out_of_place(seeds, scores):
    """The noise as the module docstring writes it: one uniform per vocabulary entry from each row's generator."""
    uniform = torch.stack([torch.rand(scores.shape[-1], generator=torch.Generator().manual_seed(s),
                                      dtype=torch.float64) for s in seeds])
    return scores.float() + (-torch.log(-torch.log(uniform.clamp(1e-300, 1 - 1e-16)))).float()


def test_noise_is_the_out_of_place_formula_bit_for_bit_and_leaves_the_scores_alone():
    seeds = [3, 99, 12345, 7, 7, 2**40]
    scores = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(0))
    given = scores.clone()
    noise = GumbelNoise(seeds)
    first = noise(None, scores)
    assert torch.equal(first, out_of_place(seeds, scores))
    assert torch.equal(scores, given)
    second = noise(None, scores)  # the next step draws the generators' next uniforms
    assert not torch.equal(first, second)
    expected = out_of_place(seeds, scores)  # (fresh generators: the first draw again)
    assert torch.equal(first, expected)
    zeros = GumbelNoise(seeds)(None, torch.zeros(ROWS, VOCAB))
    assert torch.equal(zeros[3], zeros[4])  # equal seeds, equal noise: each row depends on its own seed only
    bf16 = noise(None, scores.bfloat16())
    assert bf16.dtype == torch.float32


def test_noise_allocates_one_rows_by_vocab_float64_buffer():
    scores = torch.randn(ROWS, VOCAB)
    noise = GumbelNoise(list(range(ROWS)))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        noise(None, scores)
    big = ROWS * VOCAB * 8
    allocations = [e for e in prof.events() if e.cpu_memory_usage >= big]
    assert len(allocations) == 1, [(e.name, e.cpu_memory_usage) for e in allocations]
