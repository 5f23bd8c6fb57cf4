"""GRPOConfig / GRPOTrainer: TRL 1.16's GRPO trainer surface on alignkit's engine (`from alignkit_trl import ...`).

GRPOConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments, TRL's online fields and the GRPO
fields); each maps to alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the
weights, or is refused with the reason. GRPOTrainer takes reward functions as TRL does (alignkit.trainer_facade.
online). Imported on first use only, never by `alignkit run`.
"""

import logging
from typing import Any

import torch

import alignkit_grpo
from alignkit.trainer_facade.args import table_config
from alignkit.trainer_facade.online import ONLINE_IGNORED, ONLINE_KEYS, ONLINE_ROWS, ONLINE_UNSUPPORTED, OnlineTrainer
from alignkit_grpo.config import GRPOConfig as MethodConfig
from alignkit_grpo.objective import high_entropy_mask, off_policy_keep

#: TRL 1.16's GRPOConfig fields beyond the online ones
GRPO_ROWS: list[tuple[str, Any, Any]] = [
    ("cast_lm_head_to_fp32", bool, False), ("num_generations", int | None, 8), ("beta", float, 0.0),
    ("delta", float | None, None), ("sapo_temperature_neg", float, 1.05), ("sapo_temperature_pos", float, 1.0),
    ("vespo_k_pos", float, 2.0), ("vespo_lambda_pos", float, 3.0), ("vespo_k_neg", float, 3.0),
    ("vespo_lambda_neg", float, 2.0), ("importance_sampling_level", str, "token"),
    ("multi_objective_aggregation", str, "sum_then_normalize"), ("scale_rewards", str, "group"),
    ("loss_type", str, "dapo"), ("top_entropy_quantile", float, 1.0), ("entropy_coef", float, 0.0),
    ("use_adaptive_entropy", bool, False), ("entropy_coef_min", float, 0.0), ("entropy_coef_max", float, 1.0),
    ("entropy_coef_delta", float, 0.005), ("entropy_target", float, 0.2),
    ("max_tool_calling_iterations", int | None, None), ("vllm_importance_sampling_correction", bool, True),
    ("vllm_importance_sampling_mode", str, "sequence_mask"), ("vllm_importance_sampling_clip_max", float | None, 3.0),
    ("vllm_importance_sampling_clip_min", float | None, None), ("off_policy_mask_threshold", float | None, None),
    ("use_bias_correction_kl", bool, True), ("log_completions_hub_repo", str | None, None),
    ("vllm_importance_sampling_cap", float | None, None),
]

def _normalise(config) -> None:
    """TRL 1.16's GRPOConfig takes scale_rewards as a bool too: True is "group", False "none"."""
    config.scale_rewards = {True: "group", False: "none"}.get(config.scale_rewards, config.scale_rewards)


GRPOConfig = table_config(
    "GRPOConfig", ONLINE_ROWS + GRPO_ROWS, alignkit_grpo, __name__,
    "TRL 1.16's GRPOConfig: learning_rate 1e-6, num_generations 8, max_completion_length 512, loss_type dapo, ...",
    method_keys={
        **ONLINE_KEYS,
        "vllm_importance_sampling_correction": "method.importance_sampling_correction",
        "vllm_importance_sampling_mode": "method.importance_sampling_mode",
        "vllm_importance_sampling_clip_max": "method.importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min": "method.importance_sampling_clip_min",
    },
    unsupported={
        **ONLINE_UNSUPPORTED,
        "cast_lm_head_to_fp32": "the LM head runs in the model's precision",
        "max_tool_calling_iterations": "tool calling is not supported",
        "vllm_importance_sampling_cap": "use vllm_importance_sampling_clip_max",
    },
    ignored=ONLINE_IGNORED, normalise=_normalise,
)


log = logging.getLogger(__name__)


class GRPOTrainer(OnlineTrainer):
    """TRL 1.16's GRPOTrainer on alignkit's engine, rollout and GRPO loss."""

    _tag_names = ["trl", "grpo"]
    method_name, method_plugin, config_class, suffix = "grpo", alignkit_grpo, GRPOConfig, "GRPO"

    @property
    def entropy_coef(self) -> float:
        """The entropy bonus's coefficient now (use_adaptive_entropy moves it after each step), as TRL's trainer
        keeps it."""
        return self.engine.loss.entropy_coef

    def _start(self, *args, overrides: dict | None = None, **kwargs) -> None:
        """TRL's defaults and warnings where they differ from alignkit's: cispo without epsilon_high caps the IS
        weight at epsilon (alignkit asks for it); sequence-level ratios with a token-summed loss warn."""
        a, overrides = self.args, dict(overrides or {})
        if a.loss_type == "cispo":  # TRL reads epsilon there only as epsilon_high's default
            overrides["method.epsilon_high"] = a.epsilon if a.epsilon_high is None else a.epsilon_high
            overrides["method.epsilon"] = MethodConfig.model_fields["epsilon"].default
        if a.importance_sampling_level == "sequence" and a.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            log.warning(f"With importance_sampling_level='sequence', the {a.loss_type!r} loss sums per-token "
                        "contributions, which effectively weights each sequence by its completion length instead of "
                        "optimizing the per-sequence objective; loss_type='grpo' follows the GSPO paper's setup.")
        super()._start(*args, overrides=overrides, **kwargs)

    # ---- TRL 1.16's GRPOTrainer helpers, computed by alignkit's GRPO objective ----------------------------------

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Counted tokens whose entropy is at least the `threshold` quantile of every process's counted tokens."""
        acc = self.accelerator

        def gather(values: torch.Tensor) -> torch.Tensor:
            if acc.num_processes == 1:
                return values
            values = acc.gather(acc.pad_across_processes(values, dim=0, pad_index=-1e9))
            return values[values != -1e9]  # entropies are >= 0: the padding cannot be a value

        return high_entropy_mask(entropies, mask, 1 - threshold, gather)

    @staticmethod
    def get_off_policy_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor,
                            sampling_per_token_logps: torch.Tensor, mask: torch.Tensor,
                            off_policy_threshold: float) -> torch.Tensor:
        """[B, 1]: 0 for a negative-advantage completion whose mean KL(sampler || policy) exceeds the threshold."""
        return off_policy_keep(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)
