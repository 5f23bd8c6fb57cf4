"""RLOO (REINFORCE leave-one-out, Ahmadian et al., arXiv 2402.14740) as an alignkit method, as TRL 1.16's
RLOOTrainer: k completions per prompt, each one's baseline the mean reward of the other k - 1, the KL to the
reference in the reward, a sequence-level clipped surrogate, num_iterations passes, on the fused head."""

import alignkit
from alignkit.blocks.demo import online_demo_defaults
from alignkit_rloo.config import RLOOConfig
from alignkit_rloo.demo import RLOOFormatter
from alignkit_rloo.loss import RLOOLoss
from alignkit_rloo.rollout import RLOORollout

#: the built-in demo (tiny model, the core's builtin:sort-prompts): a few seconds of supervised warm-up, then RL that
#: raises the held-out reward within a few minutes on a laptop CPU
DEMO_DEFAULTS = online_demo_defaults(**{"method.reward_funcs": ["exact-match"], "method.beta": 0.0})

METHOD = alignkit.Method(
    name="rloo", config=RLOOConfig, formatter=RLOOFormatter, loss=RLOOLoss, rollout=RLOORollout,
    description="REINFORCE leave-one-out: online RL, each completion's baseline the mean reward of its siblings.",
    demo_data="sort-prompts", demo_defaults=DEMO_DEFAULTS, progress_metrics=("reward",),
    citation="@inproceedings{ahmadian2024back, title={Back to Basics: Revisiting REINFORCE Style Optimization for "
             "Learning from Human Feedback in LLMs}, booktitle={ACL}, year={2024}}",
)


register_methods = alignkit.registers(METHOD)


__all__ = ["DEMO_DEFAULTS", "METHOD", "RLOOConfig", "RLOOFormatter", "RLOOLoss", "RLOORollout"]
