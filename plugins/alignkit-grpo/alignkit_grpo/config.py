"""The `method:` block of a GRPO run (names and defaults follow TRL 1.x's GRPOConfig)."""

from typing import Literal

from pydantic import Field, model_validator

import alignkit

#: objective knobs -> the loss types that read them (setting one for another loss type is refused)
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
OBJECTIVE_KNOBS = {"delta": CLIPPED, "sapo_temperature_pos": ("sapo",), "sapo_temperature_neg": ("sapo",),
                   "vespo_k_pos": ("vespo",), "vespo_lambda_pos": ("vespo",), "vespo_k_neg": ("vespo",),
                   "vespo_lambda_neg": ("vespo",), "epsilon": CLIPPED, "epsilon_high": (*CLIPPED, "cispo")}


class GRPOConfig(alignkit.MethodConfig):
    name: str = "grpo"
    # ---- sampling (the rollout) ----
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (one group).")
    max_completion_length: int = Field(256, gt=0, description="Most new tokens per completion.")
    temperature: float = Field(1.0, gt=0,
                               description="Sampling temperature; the loss scores tokens at the same temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens when sampling (0: all).")
    generation_backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Sampler: transformers' generate, or vLLM (as generation.backend=vllm; generation.vllm_mode "
                    "chooses colocate or server, docs/online.md).")
    max_staleness: int = Field(0, ge=0, description="Async rollouts: the next k steps' completions are sampled by a "
                               "copy of the policy while the current step trains, so they are up to k optimizer steps "
                               "old (0: sampled when the step starts, synchronous).")
    # ---- rewards ----
    reward_funcs: list[str] = Field(default_factory=lambda: ["exact-match"], min_length=1,
                                    description="Reward functions by name (registered by plugins), or model:PATH for a "
                                    "sequence-classification reward model.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the whole batch, or not at all.")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="Several reward functions: weighted sum, then scale_rewards; or (GDPO) each "
        "function normalised within its group, then the weighted sum normalised over the step's completions.")
    # ---- the objective ----
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="The objective and its normalisation (TRL 1.16's loss_type): grpo (per completion, then "
        "mean), bnpo (all tokens of each micro-batch), dr_grpo (sum / (completions x max_completion_length)), dapo "
        "(all tokens of the step), cispo (clipped, detached IS weight x log-prob; tokens), sapo (soft sigmoid gate; "
        "per completion), luspo (sequence loss x length; needs importance_sampling_level=sequence), vespo (Gamma "
        "weight of the sequence IS ratio x log-prob; tokens). See the plugin's README.")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Importance ratio per token, or one per completion from its mean log-ratio (GSPO).")
    beta: float = Field(0.0, ge=0,
                        description="Weight of the k3 KL penalty to a frozen reference (0: no reference loaded).")
    sync_ref_model: bool = Field(False, description="Mix the policy into the reference every ref_model_sync_steps "
                                 "steps (TR-DPO's reference update, as TRL's; needs beta > 0).")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="sync_ref_model: reference <- alpha * policy + "
                                         "(1 - alpha) * reference.")
    ref_model_sync_steps: int = Field(512, gt=0, description="sync_ref_model: optimizer steps between syncs.")
    use_bias_correction_kl: bool = Field(True, description="Multiply the KL term by the importance ratio (unbiased "
                                                           "reverse-KL gradient, DeepSeek-V3.2; TRL 1.x default).")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (default: epsilon); with "
                                       "loss_type=cispo the cap of the IS weight itself (ScaleRL recommends 5.0).")
    delta: float | None = Field(None, gt=0, description="Two-sided clipping (INTELLECT-2): the ratio is also capped at "
                                "delta for negative advantages; recommended > 1 + epsilon_high (None: off).")
    sapo_temperature_pos: float = Field(1.0, gt=0, description="loss_type=sapo: gate temperature, positive advantages.")
    sapo_temperature_neg: float = Field(1.05, gt=0,
                                        description="loss_type=sapo: gate temperature, non-positive advantages.")
    vespo_k_pos: float = Field(2.0, description="loss_type=vespo: power k of the Gamma weight, advantages >= 0.")
    vespo_lambda_pos: float = Field(3.0, description="loss_type=vespo: decay lambda of the Gamma weight, "
                                                     "advantages >= 0.")
    vespo_k_neg: float = Field(3.0, description="loss_type=vespo: power k of the Gamma weight, advantages < 0.")
    vespo_lambda_neg: float = Field(2.0, description="loss_type=vespo: decay lambda of the Gamma weight, "
                                                     "advantages < 0.")
    top_entropy_quantile: float = Field(1.0, ge=0, le=1, description="Keep in the policy loss only the top quantile "
                                        "of counted tokens by entropy (0.2 in Beyond the 80/20 Rule; 1: all).")
    off_policy_mask_threshold: float | None = Field(
        None, gt=0, description="Drop completions with a negative advantage whose mean KL(old || policy) exceeds "
                                "this (DeepSeek-V3.2's delta; None: off).")
    importance_sampling_correction: bool = Field(
        True, description="With max_staleness > 0: weight each token's policy loss by the importance ratio between the "
                          "policy that trains and the older copy that sampled (TRL's vllm_importance_sampling_*).")
    importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "sequence_mask", description="Per-token or per-completion ratio (the sum of token log-ratios), clipped to "
                                     "[clip_min, clip_max] (truncate) or zeroed outside it (mask).")
    importance_sampling_clip_max: float | None = Field(3.0, gt=0, description="Upper bound of the importance ratio.")
    importance_sampling_clip_min: float | None = Field(None, ge=0,
                                                       description="Lower bound of the importance ratio (None: 0).")
    entropy_coef: float = Field(0.0, description="Entropy bonus (Skywork-OR1): the loss minus entropy_coef x the mean "
                                "entropy of each micro-batch's counted tokens (0: off). Token-local objectives only.")
    use_adaptive_entropy: bool = Field(False, description="Skywork-OR1's adaptive entropy control: entropy_coef is the "
                                       "starting coefficient; after each optimizer step it rises by entropy_coef_delta "
                                       "when the step's mean entropy (all processes) is <= entropy_target, else falls; "
                                       "the bonus applies only while the last step's entropy is <= entropy_target.")
    entropy_coef_min: float = Field(0.0, description="Adaptive entropy control: lowest coefficient.")
    entropy_coef_max: float = Field(1.0, description="Adaptive entropy control: highest coefficient.")
    entropy_coef_delta: float = Field(0.005, ge=0, description="Adaptive entropy control: the change per step.")
    entropy_target: float = Field(0.2, description="Adaptive entropy control: the target mean token entropy (nats).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per rollout (old log-probs are stored).")
    mask_truncated_completions: bool = Field(False, description="Completions cut at max_completion_length get no loss.")
    logits_chunk_size: int = Field(1024, gt=0, description="Positions per LM-head chunk (memory against speed; at "
                                   "most 2**24 / vocabulary positions, e.g. 110 at 151,936 tokens).")
    share_prompt: bool = Field(True, description="A prompt's completions run its tokens once in the log-prob "
                               "forwards (one row per group, a 4D mask; sdpa or eager attention, else off).")
    # ---- the built-in demo ----
    sft_warmup_steps: int = Field(0, ge=0, description="Supervised steps on the demo task before RL (the demo sets it; "
                                  "the result is cached under $XDG_CACHE_HOME/alignkit/grpo-warmup, by default "
                                  "~/.cache/alignkit/grpo-warmup, keyed by the starting weights, the warm-up code "
                                  "and the versions).")

    @model_validator(mode="after")
    def _async_settings(self):
        if self.max_staleness and self.importance_sampling_correction and self.loss_type == "vespo":
            raise ValueError("method.importance_sampling_correction with max_staleness > 0 is not built for loss_type "
                             "vespo (TRL folds it into vespo's own weight); set importance_sampling_correction=false "
                             "or choose another loss_type")
        if self.max_staleness and self.generation_backend != "transformers":
            raise ValueError(f"method.max_staleness={self.max_staleness} samples with transformers' generate; use "
                             "method.generation_backend=transformers or max_staleness=0")
        return self

    @model_validator(mode="after")
    def _weights_match(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"method.reward_weights has {len(self.reward_weights)} entries, method.reward_funcs "
                             f"{len(self.reward_funcs)}; give one weight per reward function")
        return self

    @model_validator(mode="after")
    def _sync_needs_a_reference(self):
        if self.sync_ref_model and self.beta == 0.0:
            raise ValueError("method.sync_ref_model=true with beta=0: no reference model is loaded, so there is "
                             "nothing to synchronize; set beta > 0 or sync_ref_model=false")
        return self

    @model_validator(mode="after")
    def _objective_fits(self):
        """Refuse knobs set away from their defaults that the chosen loss_type would ignore, and the combinations
        TRL documents as wrong."""
        for key, types in OBJECTIVE_KNOBS.items():
            if getattr(self, key) != type(self).model_fields[key].default and self.loss_type not in types:
                raise ValueError(f"method.{key} is read only by loss_type {' / '.join(types)}, not "
                                 f"{self.loss_type}; drop it or choose one of those loss types")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards != "group":
            raise ValueError(f"method.scale_rewards={self.scale_rewards} is ignored with multi_objective_aggregation "
                             "normalize_then_sum (it normalises per group, then over the step); leave it at group or "
                             "use sum_then_normalize")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError(f"method.entropy_coef_min={self.entropy_coef_min} is above method.entropy_coef_max="
                             f"{self.entropy_coef_max}; give min <= max")
        if self.entropy_bonus and not self.token_local:
            raise ValueError("method.entropy_coef needs a token-local objective, as does use_adaptive_entropy (its "
                             "gradient is taken on the fused head): not with importance_sampling_level=sequence, "
                             "loss_type luspo or vespo, top_entropy_quantile < 1 or off_policy_mask_threshold")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ValueError("method.epsilon_high must be set with loss_type cispo: it caps the IS weight itself "
                             "(without it the cap would be epsilon, e.g. 0.2; ScaleRL recommends 5.0)")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("method.importance_sampling_level must be 'sequence' with loss_type luspo "
                             f"(got {self.importance_sampling_level!r}; choose from token, sequence)")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("method.importance_sampling_level must be 'token' with loss_type vespo (it computes "
                             "its own sequence-level weights; choose from token, sequence)")
        return self

    @property
    def token_local(self) -> bool:
        """Whether each token's loss depends on that token alone (the fused head may then compute it chunk by
        chunk): no sequence-level ratio or weight, no mask that needs the whole micro-batch first."""
        return (self.importance_sampling_level == "token" and self.loss_type != "vespo"
                and self.top_entropy_quantile == 1.0 and self.off_policy_mask_threshold is None
                and not (self.corrects_staleness and self.importance_sampling_mode.startswith("sequence")))

    @property
    def entropy_bonus(self) -> bool:
        """The loss carries an entropy bonus: a fixed entropy_coef, or adaptive control (even from 0)."""
        return self.entropy_coef != 0.0 or self.use_adaptive_entropy

    @property
    def corrects_staleness(self) -> bool:
        """The loss weights the policy term by the importance ratio to the copy that sampled (async rollouts)."""
        return bool(self.max_staleness) and self.importance_sampling_correction

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
