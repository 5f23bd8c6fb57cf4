"""alignkit_reward: reward-model training (TRL's RewardTrainer) as an alignkit method plugin."""

from alignkit import Method, hookimpl, registers
from alignkit.blocks.demo import demo_defaults
from alignkit_reward import demo
from alignkit_reward.config import RewardConfig
from alignkit_reward.formatter import RewardFormatter
from alignkit_reward.loss import RewardLoss, reward_losses

METHOD = Method(
    name="reward",
    config=RewardConfig,
    formatter=RewardFormatter,
    loss=RewardLoss,
    description="Reward model (TRL's RewardTrainer): a one-label sequence classifier trained on preference pairs "
                "with -log sigmoid(r_chosen - r_rejected - margin).",
    defaults={"train.learning_rate": 1e-4},
    demo_data=demo.NAME,
    demo_defaults=demo_defaults(learning_rate=3e-3),
    progress_metrics=("accuracy", "margin"),
    model_kind="sequence-classifier",
    num_labels=1,
)


register_methods = registers(METHOD)


@hookimpl
def register_datasets(register):
    register(demo.NAME, demo.load)


__all__ = ["METHOD", "RewardConfig", "RewardFormatter", "RewardLoss", "reward_losses"]
