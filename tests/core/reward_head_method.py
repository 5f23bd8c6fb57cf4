"""A pairwise reward model as a third-party plugin would write it, through the public API only (importable as
`reward_head_method`): the method declares a sequence classifier with one label, reuses the preference formatter
by name (chosen rows, then rejected rows) and trains -log sigmoid(r_chosen - r_rejected) on the score the
classifier reads at each row's last non-pad token."""

import torch.nn.functional as F

import alignkit


class RewardHeadConfig(alignkit.MethodConfig):
    name: str = "reward-head"


class RewardHeadLoss(alignkit.Loss):
    def counts(self, batch):
        return {"pairs": batch["input_ids"].shape[0] // 2}

    def __call__(self, model, batch):
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        n = rewards.shape[0] // 2
        margin = rewards[:n] - rewards[n:]
        return alignkit.LossOutput(terms={"pairs": -F.logsigmoid(margin).sum()},
                                   metrics={"accuracy": ((margin > 0).sum(), n), "margin": (margin.detach().sum(), n)})


class RewardHeadPlugin:
    @alignkit.hookimpl
    def register_methods(self, register):
        register(alignkit.Method(name="reward-head", config=RewardHeadConfig, formatter="preference",
                                 loss=RewardHeadLoss, description="Pairwise reward model (tests).", demo_data="sort",
                                 demo_defaults={"train.learning_rate": 3e-3}, model_kind="sequence-classifier",
                                 num_labels=1))
