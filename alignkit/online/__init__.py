"""Online methods: the generation handle and its backends, reward functions and scoring, the rollout stage.

The public surface (docs/api.md): the generation handle `Generator` (`StepContext.generator`) and `mix_seed`;
reward scoring with its checks, `RewardRegistry`, `score`, `call_reward`; the common rewards the core registers
(`exact_match`, `regex_match`, `length_penalty`) and their fixed-setting makers (`regex_reward`,
`length_penalty_reward`); `Judge`, a causal LM asked for a score or a preference; the `Rollout` Protocol a method's
rollout follows.
"""

from alignkit.online.common_rewards import (
    exact_match,
    length_penalty,
    length_penalty_reward,
    regex_match,
    regex_reward,
)
from alignkit.online.generation import GenerationBackend, Generator, mix_seed
from alignkit.online.judge import Judge
from alignkit.online.rewards import RewardRegistry, call_reward, score
from alignkit.online.rollout import Rollout

__all__ = [
    "GenerationBackend", "Generator", "Judge", "RewardRegistry", "call_reward", "exact_match", "length_penalty",
    "length_penalty_reward", "mix_seed", "regex_match", "regex_reward", "Rollout", "score",
]
