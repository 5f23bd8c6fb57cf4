"""GRPOTrainer's TRL 1.16 surface beyond training: the helpers TRL's GRPOTrainer offers (get_high_entropy_mask,
get_off_policy_mask), computed by alignkit's GRPO objective."""

from types import SimpleNamespace

import torch
from alignkit_trl import GRPOTrainer


def one_process():
    return SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x,
                                                       pad_across_processes=lambda x, dim, pad_index: x))


def test_high_entropy_mask_keeps_the_counted_tokens_at_or_above_the_quantile():
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # counted: 0.1 .. 0.6; their 0.5-quantile is 0.35
    got = GRPOTrainer.get_high_entropy_mask(one_process(), entropies, mask, 0.5)
    assert got.tolist() == [[False, False, False, True], [True, True, False, False]]
    assert not GRPOTrainer.get_high_entropy_mask(one_process(), entropies, torch.zeros_like(mask), 0.5).any()


def test_off_policy_mask_drops_only_negative_advantages_far_from_the_sampler():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    logps = torch.tensor([[-2.0, -2.0, -99.0], [-2.0, -2.0, -2.0], [-0.5, -0.5, -0.5]])
    advantages = torch.tensor([[-1.0], [1.0], [-1.0]])
    got = GRPOTrainer.get_off_policy_mask(advantages, logps, torch.zeros_like(logps), mask, 1.0)
    assert got.tolist() == [[0.0], [1.0], [1.0]]  # mean KL 2 (padding ignored) with a negative advantage: dropped
