"""Online DPO (Guo et al., arXiv 2402.04792), as TRL 1.16's experimental OnlineDPOTrainer: two samples per prompt
from the policy, ranked by reward functions, reward models or a pairwise judge (alignkit_dpo.online_rollout), then
the DPO loss
against the reference with every loss type, loss list and option of this plugin's DPO (alignkit_dpo.DPOLoss).

`ipo` is OnlineDPOTrainer's: (summed log-ratio difference - 1 / (2 beta))^2, not DPOTrainer's per-token means.
"""

from typing import ClassVar

import torch
from pydantic import Field, model_validator

import alignkit
from alignkit.blocks.demo import online_demo_defaults, sft_warmup
from alignkit.formatters import PromptOnlyFormatter
from alignkit_dpo import DPOConfig, DPOLoss, full_weights_for_sync
from alignkit_dpo.losses import LOSSES
from alignkit_dpo.online_rollout import OnlineDPORollout


class OnlineDPOConfig(DPOConfig):
    name: str = "online-dpo"
    num_generations: ClassVar[int] = 2  # two samples per prompt: one pair (the core's group rollout reads it)
    # ---- sampling (TRL 1.16's OnlineDPOConfig names and defaults) ----
    max_new_tokens: int = Field(64, gt=0, description="Most new tokens per completion.")
    max_length: int = Field(512, gt=0, description="Most tokens of prompt + completion in the loss's forward: "
                            "longer rows lose their first (prompt) columns.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature (the loss scores at temperature 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens when sampling (0: all).")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of a completion "
                                              "without EOS before ranking (null: none).")
    # ---- rewards ----
    reward_funcs: list[str] = Field(default_factory=list, description="Reward functions by name (registered by "
                                    "plugins), or model:PATH for a sequence-classification reward model; required.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1).")
    judge: str | None = Field(None, description="A pairwise judge that picks the better sample of each pair instead "
                              "of the rewards (TRL's OnlineDPOTrainer(judge=...)): judge:MODEL, MODEL a causal LM "
                              "folder, a hub name or builtin:tiny; its prompt is rewards.judge_pairwise_template. "
                              "reward_funcs, if any, are then only logged.")
    # ---- the built-in demo ----
    sft_warmup_steps: int = Field(0, ge=0, description="Supervised steps on the demo task before training (the demo "
                                  "sets it; seeded, at every start, before the reference is copied).")

    @property
    def max_completion_length(self) -> int:  # the core's group rollout's name for max_new_tokens
        return self.max_new_tokens

    @model_validator(mode="after")
    def _online(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"method.reward_weights has {len(self.reward_weights)} entries, method.reward_funcs "
                             f"{len(self.reward_funcs)}; give one weight per reward function")
        if self.judge is not None:
            from alignkit.online.judge import JUDGE_PREFIX, check_judge

            if not self.judge.startswith(JUDGE_PREFIX):
                raise ValueError(f"method.judge={self.judge!r}: write judge:MODEL (e.g. judge:builtin:tiny or "
                                 "judge:path/to/causal-lm)")
            check_judge(self.judge, "method.judge")
        if self.precompute_ref_log_probs:
            raise ValueError("method.precompute_ref_log_probs: Online DPO samples new completions every step, so "
                             "the reference log-probs cannot be computed before training; set it to false")
        return self


class OnlineDPOFormatter(PromptOnlyFormatter):
    """`prompt` rows (standard or conversational), every other column kept for the rewards; with
    method.sft_warmup_steps, that many supervised steps on the demo task first."""

    def check_data(self, dataset, source: str, pm=None, run=None) -> None:
        """The data has every column the configured rewards read (alignkit.online.rewards.check_data)."""
        from alignkit import get_plugin_manager
        from alignkit.online.rewards import MODEL_PREFIX, RewardRegistry, check_data

        names = [n for n in self.config.reward_funcs if not n.startswith(MODEL_PREFIX)]
        check_data(RewardRegistry.from_plugins(pm or get_plugin_manager()).select(names), dataset, source)

    def prepare_model(self, model) -> None:
        if self.config.sft_warmup_steps:
            with torch.random.fork_rng():
                sft_warmup(model, self.tokenizer, self.config.sft_warmup_steps)


def online_ipo(p, c):
    """OnlineDPOTrainer's IPO: on the summed log-ratios (DPOTrainer's averages them over the answer tokens)."""
    return (p.delta() - 1 / (2 * c.beta)) ** 2


class OnlineDPOLoss(DPOLoss):
    """The DPO loss on the rollout's pairs, with OnlineDPOTrainer's objective/* metrics as exact (sum, count)."""

    losses = {**LOSSES, "ipo": online_ipo}

    def __call__(self, model, batch, ref, ctx=None):
        out = super().__call__(model, batch, ref, ctx)
        if "scores" in batch:
            out.metrics.update(online_metrics(batch, out.metrics, ref, self.config.beta))
        return out


def online_metrics(batch: dict, metrics: dict, ref: dict, beta: float) -> dict:
    """TRL's objective/* and val/* metrics, the raw mean reward (`reward`) and per-function means."""
    with torch.no_grad():
        n = batch["input_ids"].shape[0] // 2
        logps_sum = n * (metrics["logps/chosen"] + metrics["logps/rejected"])  # summed over all 2n completions
        kl = logps_sum - ref["chosen"].sum() - ref["rejected"].sum()
        scores, rewards = batch["scores"], batch["rewards"]
        out = {"objective/kl": (kl, 2 * n), "objective/entropy": (-logps_sum, 2 * n),
               "objective/non_score_reward": (-beta * kl, 2 * n), "objective/scores": (scores.sum(), 2 * n),
               "objective/rlhf_reward": (scores.sum() - beta * kl, 2 * n),
               "objective/scores_margin": ((scores[:n] - scores[n:]).sum(), n),
               "val/contain_eos_token": (batch["contain_eos"].float().sum(), 2 * n),
               "reward": (rewards.nan_to_num(0.0).sum(), (~torch.isnan(rewards)).sum()),
               "completions/mean_length": (batch["completion_length"].float().sum(), 2 * n),
               "beta": torch.tensor(float(beta))}
        for i, name in enumerate(batch["reward_names"]):
            column = batch["rewards_per_func"][:, i]
            out[f"rewards/{name}/mean"] = (column.nan_to_num(0.0).sum(), (~torch.isnan(column)).sum())
    return out


#: the built-in demo: the online methods' sorting task (builtin:sort-prompts) after a supervised warm-up; 64 prompts
#: x 2 samples per step, the 128 completions of the RLOO and GRPO demos' 16 prompts x 8
DEMO_DEFAULTS = {k: v for k, v in online_demo_defaults(**{
    "method.reward_funcs": ["exact-match"], "method.max_new_tokens": 14, "method.temperature": 1.0,
    "train.per_device_train_batch_size": 64,
}).items() if k not in ("method.num_generations", "method.max_completion_length")}

ONLINE_DPO = alignkit.Method(
    name="online-dpo", config=OnlineDPOConfig, formatter=OnlineDPOFormatter, loss=OnlineDPOLoss,
    rollout=OnlineDPORollout, defaults={"train.learning_rate": 5e-7},
    description="Online DPO: two samples per prompt ranked by reward, then the DPO loss family against the reference.",
    demo_data="sort-prompts", demo_defaults=DEMO_DEFAULTS, progress_metrics=("reward",),
    validate=full_weights_for_sync,
    citation="@article{guo2024direct, title={Direct Language Model Alignment from Online AI Feedback}, "
             "journal={arXiv:2402.04792}, year={2024}}",
)
