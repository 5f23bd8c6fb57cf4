"""Group-normalised advantages from the completions' rewards.

Rewards arrive as [N, F] (one column per reward function, NaN where a function returned None); a
completion's reward is the weighted sum over the functions that applied (NaN if none did). Each group
holds the `n` consecutive completions of one prompt. An unscorable completion (NaN) is left out of its
group's statistics and gets advantage 0.
"""

import torch

EPS = 1e-4  # added to the std before dividing (TRL's value)


def normalize_then_sum(rewards_NF: torch.Tensor, n: int, weights: list[float]) -> torch.Tensor:
    """GDPO's aggregation: each function's rewards normalised within each group of `n` ((r - mean) / (std + EPS),
    NaN where the function did not apply or applied to fewer than two of the group), then their weighted sum over
    the functions that gave a value; NaN where no function applied."""
    groups = rewards_NF.view(-1, n, rewards_NF.shape[-1])
    mean = torch.nanmean(groups, dim=1, keepdim=True)
    normalised = ((groups - mean) / (nan_std(groups, dim=1, keepdim=True) + EPS)).view_as(rewards_NF)
    w = torch.tensor(weights, dtype=rewards_NF.dtype, device=rewards_NF.device)
    total = (normalised * w).nansum(-1)
    return total.masked_fill(torch.isnan(rewards_NF).all(-1), float("nan"))


def nan_std(x: torch.Tensor, dim=None, keepdim=False) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected) over the non-NaN values; NaN with fewer than two."""
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nansum((x - mean) ** 2)
    std = torch.where(count > 1, var / (count - 1).clamp(min=1), torch.full_like(var, float("nan"))).sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def advantages(rewards_N: torch.Tensor, n: int, scale: str, batch_std: float | None = None):
    """(advantages [N], the std each row was judged by [N]) for `scale` group / batch / none.

    `batch_std` is the std over the whole step (all micro-batches and processes), needed for "batch".
    """
    groups = rewards_N.view(-1, n)
    mean = torch.nanmean(groups, dim=1, keepdim=True).expand_as(groups).reshape(-1)
    if scale == "batch":
        std = torch.full_like(rewards_N, float("nan") if batch_std is None else batch_std)
    else:  # group (also what "none" reports as its zero-std statistic)
        std = nan_std(groups, dim=1, keepdim=True).expand_as(groups).reshape(-1)
    adv = rewards_N - mean
    if scale != "none":
        adv = adv / (std + EPS)
    return adv.nan_to_num(0.0), std
