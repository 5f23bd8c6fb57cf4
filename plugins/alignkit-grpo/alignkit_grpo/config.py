"""The `method:` block of a GRPO run (names and defaults follow TRL 1.x's GRPOConfig)."""

from typing import Literal

from pydantic import Field, model_validator

import alignkit


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
    # ---- the objective ----
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="Token normalisation: grpo (per completion, then mean), dapo (all tokens of the batch), "
                            "dr_grpo (sum / (completions x max_completion_length)).")
    beta: float = Field(0.0, ge=0,
                        description="Weight of the k3 KL penalty to a frozen reference (0: no reference loaded).")
    use_bias_correction_kl: bool = Field(True, description="Multiply the KL term by the importance ratio (unbiased "
                                                           "reverse-KL gradient, DeepSeek-V3.2; TRL 1.x default).")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range of the importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (default: epsilon).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per rollout (old log-probs are stored).")
    mask_truncated_completions: bool = Field(False, description="Completions cut at max_completion_length get no loss.")
    logits_chunk_size: int = Field(1024, gt=0, description="Positions per LM-head chunk (memory against speed).")
    # ---- the built-in demo ----
    sft_warmup_steps: int = Field(0, ge=0, description="Supervised steps on the demo task before RL (the demo sets it; "
                                  "the result is cached under $XDG_CACHE_HOME/alignkit/grpo-warmup, by default "
                                  "~/.cache/alignkit/grpo-warmup, keyed by the starting weights, the warm-up code "
                                  "and the versions).")

    @model_validator(mode="after")
    def _async_settings(self):
        if self.max_staleness and self.num_iterations > 1:
            raise ValueError(f"method.max_staleness={self.max_staleness} trains each rollout once; it cannot be "
                             f"combined with method.num_iterations={self.num_iterations} (set one of them back)")
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

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
