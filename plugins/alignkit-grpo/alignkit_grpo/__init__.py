"""GRPO (Shao et al., arXiv 2402.03300) with TRL 1.16's loss family (alignkit_grpo.objective), as an alignkit method."""

import alignkit
from alignkit.blocks.demo import online_demo_defaults
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.formatter import GRPOFormatter
from alignkit_grpo.loss import GRPOLoss
from alignkit_grpo.rewards import DEMO as DEMO_REWARDS
from alignkit_grpo.rollout import GRPORollout

#: the built-in demo (tiny model, the core's builtin:sort-prompts): a few seconds of supervised warm-up, then RL that
#: raises the held-out reward within a few minutes on a laptop CPU
DEMO_DEFAULTS = online_demo_defaults(**{"method.reward_funcs": ["sort-order", "exact-match"],
                                         "method.temperature": 1.0})

METHOD = alignkit.Method(
    name="grpo", config=GRPOConfig, formatter=GRPOFormatter, loss=GRPOLoss, rollout=GRPORollout,
    description="Group Relative Policy Optimization: online RL with group-normalised rewards (TRL 1.16's loss types).",
    demo_data="sort-prompts", demo_defaults=DEMO_DEFAULTS, progress_metrics=("reward",),
    citation="@article{shao2024deepseekmath, title={DeepSeekMath: Pushing the Limits of Mathematical Reasoning in "
             "Open Language Models}, journal={arXiv:2402.03300}, year={2024}}",
)


register_methods = alignkit.registers(METHOD)


@alignkit.hookimpl
def register_rewards(register):
    for name, fn in DEMO_REWARDS.items():
        register(name, fn)


__all__ = ["DEMO_DEFAULTS", "METHOD", "GRPOConfig", "GRPOFormatter", "GRPOLoss", "GRPORollout"]
