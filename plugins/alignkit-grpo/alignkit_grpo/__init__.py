"""GRPO (Shao et al., arXiv 2402.03300) with the DAPO and Dr. GRPO token normalisations, as an alignkit method."""

import alignkit
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.loss import GRPOLoss
from alignkit_grpo.rewards import BUILTIN as BUILTIN_REWARDS
from alignkit_grpo.rollout import GRPORollout


@alignkit.hookimpl
def register_rewards(register):
    for name, fn in BUILTIN_REWARDS.items():
        register(name, fn)


__all__ = ["GRPOConfig", "GRPOLoss", "GRPORollout"]
