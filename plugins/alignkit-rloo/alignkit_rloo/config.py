"""The `method:` block of an RLOO run (names and defaults follow TRL 1.16's RLOOConfig)."""

from pydantic import Field, field_validator, model_validator

import alignkit


class RLOOConfig(alignkit.MethodConfig):
    name: str = "rloo"
    # ---- sampling (the rollout) ----
    num_generations: int = Field(2, description="Completions sampled per prompt (k >= 2: the leave-one-out "
                                                "baseline of each is the mean reward of the other k - 1).")
    max_completion_length: int = Field(512, gt=0, description="Most new tokens per completion.")
    temperature: float = Field(1.0, gt=0,
                               description="Sampling temperature; the loss scores tokens at the same temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens when sampling (0: all).")
    # ---- rewards ----
    reward_funcs: list[str] = Field(default_factory=lambda: ["exact-match"], min_length=1,
                                    description="Reward functions by name (registered by plugins), or model:PATH for a "
                                    "sequence-classification reward model.")
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1).")
    reward_clip_range: tuple[float, float] | None = Field(None, description="Clip each completion's reward to "
                                                                            "(min, max) before the KL penalty.")
    normalize_advantages: bool = Field(False, description="Normalise the advantages over the step's completions (all "
                                                          "processes) to mean 0 and std 1.")
    # ---- the objective ----
    beta: float = Field(0.05, ge=0, description="KL coefficient: the reward of each completion loses beta x the sum of "
                        "its tokens' log(pi / pi_ref) at sampling time, TRL's KL in the reward (0: no reference "
                        "loaded).")
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range of the sequence importance ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (default: epsilon).")
    sync_ref_model: bool = Field(False, description="Mix the policy into the reference every ref_model_sync_steps "
                                 "optimizer steps (TR-DPO's trust region; needs beta != 0 and full fine-tuning).")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="reference <- alpha * policy + (1 - alpha) * "
                                         "reference at each sync.")
    ref_model_sync_steps: int = Field(512, gt=0, description="Optimizer steps between reference syncs.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per rollout (old log-probs are stored).")
    mask_truncated_completions: bool = Field(False, description="Completions cut at max_completion_length get no "
                                                                "gradient (their tokens are masked).")
    logits_chunk_size: int = Field(1024, gt=0, description="Positions per LM-head chunk (memory against speed; at "
                                   "most 2**24 / vocabulary positions, e.g. 110 at 151,936 tokens).")
    share_prompt: bool = Field(True, description="A prompt's completions run its tokens once in the log-prob "
                               "forwards (one row per group, a 4D mask; sdpa or eager attention, else off).")
    # ---- the built-in demo ----
    sft_warmup_steps: int = Field(0, ge=0, description="Supervised steps on the demo task before RL (the demo sets "
                                  "it; a few seconds, seeded, at every start, before any checkpoint is loaded).")

    @field_validator("num_generations")
    @classmethod
    def _at_least_two(cls, value: int) -> int:
        if value < 2:
            raise ValueError("RLOO's leave-one-out baseline needs at least 2 completions per prompt; set it to 2 "
                             "or more")
        return value

    @model_validator(mode="after")
    def _settings_agree(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"method.reward_weights has {len(self.reward_weights)} entries, method.reward_funcs "
                             f"{len(self.reward_funcs)}; give one weight per reward function")
        if self.sync_ref_model and self.beta == 0.0:
            raise ValueError("method.sync_ref_model with method.beta=0: no reference model is loaded, so there is "
                             "nothing to sync; set method.beta != 0 or method.sync_ref_model=false")
        if self.reward_clip_range is not None and self.reward_clip_range[0] > self.reward_clip_range[1]:
            raise ValueError(f"method.reward_clip_range={list(self.reward_clip_range)}: give [min, max] with "
                             "min <= max")
        return self

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
