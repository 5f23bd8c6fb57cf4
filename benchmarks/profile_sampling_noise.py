"""Per-token cost of the sampler's Gumbel noise at 128 rows x 151,936 (old: stack + out-of-place logs, as before
commit 0e9d051; new: alignkit.online.sampling), beside softmax + multinomial (TRL's sampler), and its allocations.

    python benchmarks/profile_sampling_noise.py
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from alignkit.online.sampling import GumbelNoise

V, R = 151936, 128


def old(gens, scores):
    u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in gens])
    return scores.float() + (-torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))).to(dtype=torch.float32)


def main() -> None:
    scores = torch.randn(R, V)
    for _ in range(3):
        t = time.perf_counter()
        a = old([torch.Generator().manual_seed(i) for i in range(R)], scores)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        b = GumbelNoise(list(range(R)))(None, scores)
        t_new = time.perf_counter() - t
        t = time.perf_counter()
        torch.multinomial(torch.softmax(scores, -1), 1)
        t_trl = time.perf_counter() - t
        print(f"old {t_old:.3f} s  new {t_new:.3f} s  (softmax+multinomial, TRL's sampler: {t_trl:.3f} s)  "
              f"equal {torch.equal(a, b)}")
    for name, fn in (("old", lambda: old([torch.Generator().manual_seed(i) for i in range(R)], scores)),
                     ("new", lambda: GumbelNoise(list(range(R)))(None, scores))):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        big = [e for e in prof.events() if e.cpu_memory_usage >= R * V * 8]
        print(name, "allocations of >= 155 MB:", len(big), "total allocated MB:",
              round(sum(max(e.cpu_memory_usage, 0) for e in prof.events()) / 2**20))


if __name__ == "__main__":
    main()
