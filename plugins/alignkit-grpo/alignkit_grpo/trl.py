"""GRPOConfig / GRPOTrainer: TRL 1.16's GRPO trainer surface on alignkit's engine (`from alignkit_trl import ...`).

GRPOConfig has TRL 1.16's fields and defaults (transformers.TrainingArguments plus the GRPO fields); each maps to
alignkit (alignkit.trainer_facade), is ignored with a warning where that cannot change the weights, or is refused
with the reason. GRPOTrainer takes reward functions as TRL does: callables (called with prompts=, completions= and
the dataset's other columns), names of alignkit's registered rewards (e.g. "exact-match"), or a reward model (its
folder or hub name, or a loaded sequence-classification model). Imported on first use only.
"""

from typing import Any

import alignkit
import alignkit_grpo
from alignkit.trainer_facade import FacadeTrainer
from alignkit.trainer_facade.args import table_config

#: TRL 1.16's GRPOConfig fields beyond TrainingArguments (and the defaults it changes), in its order
ROWS: list[tuple[str, Any, Any]] = [
    ("learning_rate", float, 1e-06), ("remove_unused_columns", bool | None, False),
    ("model_init_kwargs", dict | str | None, None), ("trust_remote_code", bool, False),
    ("router_aux_loss_coef", float | None, None), ("disable_dropout", bool, False),
    ("cast_lm_head_to_fp32", bool, False), ("num_generations", int | None, 8),
    ("num_generations_eval", int | None, None), ("max_completion_length", int | None, 512),
    ("ds3_gather_for_generation", bool, True), ("shuffle_dataset", bool | None, True),
    ("pad_to_multiple_of", int | str | None, "auto"), ("generation_batch_size", int | None, None),
    ("steps_per_generation", int | None, None), ("temperature", float, 1.0), ("top_p", float, 1.0),
    ("top_k", int, 0), ("min_p", float | None, None), ("generation_kwargs", dict | str | None, None),
    ("chat_template_kwargs", dict | str | None, None), ("repetition_penalty", float, 1.0),
    ("cache_implementation", str | None, None), ("use_vllm", bool, False), ("vllm_mode", str, "colocate"),
    ("vllm_model_impl", str, "vllm"), ("vllm_enable_sleep_mode", bool, False),
    ("vllm_structured_outputs_regex", str | None, None), ("vllm_server_base_url", str | None, None),
    ("vllm_server_host", str, "0.0.0.0"), ("vllm_server_port", int, 8000), ("vllm_server_timeout", float, 240.0),
    ("vllm_group_port", int, 51216), ("vllm_gpu_memory_utilization", float, 0.3),
    ("vllm_max_model_length", int | None, None), ("vllm_tensor_parallel_size", int, 1), ("beta", float, 0.0),
    ("num_iterations", int, 1), ("epsilon", float, 0.2), ("delta", float | None, None),
    ("epsilon_high", float | None, None), ("sapo_temperature_neg", float, 1.05), ("sapo_temperature_pos", float, 1.0),
    ("vespo_k_pos", float, 2.0), ("vespo_lambda_pos", float, 3.0), ("vespo_k_neg", float, 3.0),
    ("vespo_lambda_neg", float, 2.0), ("importance_sampling_level", str, "token"),
    ("reward_weights", list[float] | None, None), ("multi_objective_aggregation", str, "sum_then_normalize"),
    ("scale_rewards", str, "group"), ("loss_type", str, "dapo"), ("mask_truncated_completions", bool, False),
    ("sync_ref_model", bool, False), ("ref_model_mixup_alpha", float, 0.6), ("ref_model_sync_steps", int, 512),
    ("top_entropy_quantile", float, 1.0), ("entropy_coef", float, 0.0), ("use_adaptive_entropy", bool, False),
    ("entropy_coef_min", float, 0.0), ("entropy_coef_max", float, 1.0), ("entropy_coef_delta", float, 0.005),
    ("entropy_target", float, 0.2), ("max_tool_calling_iterations", int | None, None),
    ("vllm_importance_sampling_correction", bool, True), ("vllm_importance_sampling_mode", str, "sequence_mask"),
    ("vllm_importance_sampling_clip_max", float | None, 3.0), ("vllm_importance_sampling_clip_min", float | None, None),
    ("off_policy_mask_threshold", float | None, None), ("use_bias_correction_kl", bool, True),
    ("log_completions", bool, False), ("log_multimodal", bool, True), ("num_completions_to_print", int | None, None),
    ("log_unique_prompts", bool, False), ("log_completions_hub_repo", str | None, None),
    ("use_transformers_continuous_batching", bool, False),
    ("transformers_continuous_batching_config", dict | str | None, None), ("use_transformers_paged", bool, False),
    ("vllm_importance_sampling_cap", float | None, None),
]

_VLLM = "with use_vllm, alignkit's vLLM sampler is set by the generation.* keys (docs/online.md)"
_NO_WEIGHTS = "what is logged or printed only"
GRPOConfig = table_config(
    "GRPOConfig", ROWS, alignkit_grpo, __name__,
    "TRL 1.16's GRPOConfig: learning_rate 1e-6, num_generations 8, max_completion_length 512, loss_type dapo, ...",
    method_keys={
        "use_vllm": lambda v: {"method.generation_backend": "vllm" if v else "transformers"},
        "shuffle_dataset": lambda v: {"train.shuffle": bool(v)},
        "vllm_importance_sampling_correction": "method.importance_sampling_correction",
        "vllm_importance_sampling_mode": "method.importance_sampling_mode",
        "vllm_importance_sampling_clip_max": "method.importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min": "method.importance_sampling_clip_min",
    },
    unsupported={
        "cast_lm_head_to_fp32": "the LM head runs in the model's precision",
        "num_generations_eval": "evaluation samples num_generations completions per prompt",
        "generation_batch_size": "one rollout per optimizer step (per_device_train_batch_size x "
                                 "gradient_accumulation_steps completions)",
        "steps_per_generation": "one rollout per optimizer step (use gradient_accumulation_steps)",
        "min_p": "not a sampling option of alignkit's rollout", "generation_kwargs": "set the method's sampling keys",
        "chat_template_kwargs": "not supported", "repetition_penalty": "not a sampling option of alignkit's rollout",
        "sync_ref_model": "alignkit's GRPO keeps the reference frozen",
        "ref_model_mixup_alpha": "alignkit's GRPO keeps the reference frozen",
        "ref_model_sync_steps": "alignkit's GRPO keeps the reference frozen",
        "use_adaptive_entropy": "entropy_coef is fixed", "max_tool_calling_iterations": "tool calling is not supported",
        "vllm_importance_sampling_cap": "use vllm_importance_sampling_clip_max",
        "use_transformers_continuous_batching": "alignkit generates with transformers' generate or vLLM",
        "use_transformers_paged": "alignkit generates with transformers' generate or vLLM",
        "router_aux_loss_coef": "MoE router auxiliary losses are not added",
        **{k: _VLLM for k in ("vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
                              "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
                              "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                              "vllm_tensor_parallel_size")},
    },
    ignored={**dict.fromkeys(("log_completions", "log_multimodal", "num_completions_to_print", "log_unique_prompts",
                              "log_completions_hub_repo"), _NO_WEIGHTS),
             "ds3_gather_for_generation": "a DeepSpeed ZeRO-3 memory setting",
             "cache_implementation": "a generation cache layout only"},
)


class _Rewards:
    """The trainer's reward callables as a plugin: registered under their own names (TRL logs rewards/NAME)."""

    def __init__(self, functions: dict) -> None:
        self.functions = functions

    @alignkit.hookimpl
    def register_rewards(self, register):
        for name, fn in self.functions.items():
            register(name, fn)


def reward_names(reward_funcs, known: set[str]) -> tuple[list[str], dict]:
    """alignkit reward names for TRL's reward_funcs, and the callables to register under theirs."""
    funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    names, callables = [], {}
    for fn in funcs:
        if isinstance(fn, str):
            names.append(fn if fn in known or fn.startswith("model:") else f"model:{fn}")
        elif hasattr(fn, "config") and hasattr(fn, "forward"):  # a loaded reward model: alignkit loads its folder
            path = getattr(fn.config, "_name_or_path", "")
            if not path:
                raise ValueError("GRPOTrainer(reward_funcs=...): pass a reward model loaded with from_pretrained (or "
                                 "its folder or hub name); alignkit loads it itself")
            names.append(f"model:{path}")
        elif callable(fn):
            base = getattr(fn, "__name__", type(fn).__name__)
            name, i = base, 2
            while name in known or name in callables:
                name, i = f"{base}_{i}", i + 1
            callables[name] = fn
            names.append(name)
        else:
            raise ValueError(f"GRPOTrainer(reward_funcs=...): {fn!r} is neither a function, a reward name nor a "
                             "reward model")
    return names, callables


class GRPOTrainer(FacadeTrainer):
    """TRL 1.16's GRPOTrainer on alignkit's engine, rollout and GRPO loss."""

    method_name, method_plugin, config_class, suffix = "grpo", alignkit_grpo, GRPOConfig, "GRPO"

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers: tuple = (None, None), quantization_config=None, peft_config=None, tools=None,
                 rollout_func=None, environment_factory=None) -> None:
        cls = type(self)
        self.args = self._args(args, cls.config_class, f"{self._model_name(model).split('/')[-1]}-{cls.suffix}")
        self._refuse(reward_processing_classes=(reward_processing_classes, "a reward model is read with its own "
                                                                           "tokenizer (saved beside it)"),
                     quantization_config=(quantization_config, "load the quantized model yourself and pass it"),
                     tools=(tools, "tool calling is not supported"),
                     rollout_func=(rollout_func, "alignkit's rollout samples with the policy"),
                     environment_factory=(environment_factory, "environments are not supported"))
        if reward_funcs is None or reward_funcs == []:
            raise ValueError(f"{cls.__name__} needs reward_funcs: functions, alignkit reward names or a reward model")
        known = set(_registered_rewards())
        names, callables = reward_names(reward_funcs, known)
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        self.reward_func_names = names
        plugins = [cls.method_plugin, _Rewards(callables)]
        self._start(cls.method_name, plugins, model, self.args, train_dataset, eval_dataset, processing_class, None,
                    callbacks, optimizers, peft_config, overrides={"method.reward_funcs": names})
        self.num_generations = self.args.num_generations


def _registered_rewards() -> list[str]:
    from alignkit.online import RewardRegistry

    return list(RewardRegistry.from_plugins(alignkit.get_plugin_manager()).functions)
