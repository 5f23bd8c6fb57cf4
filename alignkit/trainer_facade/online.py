"""The online (sampling) half of TRL 1.x's trainers, shared by every online method's TRL-style trainer: the config
fields TRL's online trainers have in common (sampling, vLLM, completion logging) with how each maps to alignkit,
and `OnlineTrainer`, which takes reward functions as TRL does: callables (called with prompts=, completions= and
the dataset's other columns), names of rewards registered with alignkit (e.g. "exact-match"), or a reward model
(its folder or hub name, or a model loaded with from_pretrained)."""

from collections import defaultdict, deque
from typing import Any

import alignkit
from alignkit.trainer_facade.trainer import FacadeTrainer

#: (name, type, default) of TRL 1.16's fields common to its online trainers (GRPOConfig, RLOOConfig), its order
ONLINE_ROWS: list[tuple[str, Any, Any]] = [
    ("learning_rate", float, 1e-06), ("remove_unused_columns", bool | None, False),
    ("model_init_kwargs", dict | str | None, None), ("trust_remote_code", bool, False),
    ("router_aux_loss_coef", float | None, None), ("disable_dropout", bool, False),
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
    ("vllm_max_model_length", int | None, None), ("vllm_tensor_parallel_size", int, 1),
    ("num_iterations", int, 1), ("epsilon", float, 0.2), ("epsilon_high", float | None, None),
    ("reward_weights", list[float] | None, None), ("mask_truncated_completions", bool, False),
    ("sync_ref_model", bool, False), ("ref_model_mixup_alpha", float, 0.6), ("ref_model_sync_steps", int, 512),
    ("log_completions", bool, False), ("log_multimodal", bool, True), ("num_completions_to_print", int | None, None),
    ("log_unique_prompts", bool, False), ("use_transformers_continuous_batching", bool, False),
    ("transformers_continuous_batching_config", dict | str | None, None), ("use_transformers_paged", bool, False),
]

_VLLM = "with use_vllm, alignkit's vLLM sampler is set by the generation.* keys (docs/online.md)"
ONLINE_KEYS: dict[str, Any] = {
    "use_vllm": lambda v: {"method.generation_backend": "vllm"} if v else {},
    "shuffle_dataset": lambda v: {"train.shuffle": bool(v)},
}
ONLINE_UNSUPPORTED: dict[str, str] = {
    "generation_batch_size": "one rollout per optimizer step (per_device_train_batch_size x "
                             "gradient_accumulation_steps completions)",
    "steps_per_generation": "one rollout per optimizer step (use gradient_accumulation_steps)",
    "min_p": "not a sampling option of alignkit's rollout", "generation_kwargs": "set the method's sampling keys",
    "chat_template_kwargs": "not supported", "repetition_penalty": "not a sampling option of alignkit's rollout",
    "use_transformers_continuous_batching": "alignkit generates with transformers' generate or vLLM",
    "use_transformers_paged": "alignkit generates with transformers' generate or vLLM",
    "router_aux_loss_coef": "MoE router auxiliary losses are not added",
    **dict.fromkeys(("vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex",
                     "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
                     "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                     "vllm_tensor_parallel_size"), _VLLM),
}
_LOGGED = "what is logged or printed only"
ONLINE_IGNORED: dict[str, str] = {
    **dict.fromkeys(("log_completions", "log_multimodal", "num_completions_to_print", "log_unique_prompts",
                     "log_completions_hub_repo"), _LOGGED),
    "ds3_gather_for_generation": "a DeepSpeed ZeRO-3 memory setting",
    "num_generations_eval": "evaluation samples num_generations completions per prompt; the eval metrics only",
    "cache_implementation": "a generation cache layout only",
}


class _Rewards:
    """The trainer's reward callables as a plugin: registered under their own names (TRL logs rewards/NAME)."""

    def __init__(self, functions: dict, on_start=None) -> None:
        self.functions, self.on_start = functions, on_start

    @alignkit.hookimpl
    def register_rewards(self, register):
        for name, fn in self.functions.items():
            register(name, fn)

    @alignkit.hookimpl
    def on_train_start(self, run):
        if self.on_start is not None:
            self.on_start()


def reward_names(reward_funcs, known: set[str], owner: str = "GRPOTrainer") -> tuple[list[str], dict]:
    """alignkit reward names for TRL's reward_funcs (`known`: the registered names), and the callables to register
    under theirs (a function's __name__, numbered when taken)."""
    funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    names, callables = [], {}
    for fn in funcs:
        if isinstance(fn, str):
            names.append(fn if fn in known or fn.startswith("model:") else f"model:{fn}")
        elif hasattr(fn, "config") and hasattr(fn, "forward"):  # a loaded reward model: alignkit loads its folder
            path = getattr(fn.config, "_name_or_path", "")
            if not path:
                raise ValueError(f"{owner}(reward_funcs=...): pass a reward model loaded with from_pretrained (or its "
                                 "folder or hub name); alignkit loads it itself")
            names.append(f"model:{path}")
        elif callable(fn):
            base = getattr(fn, "__name__", type(fn).__name__)
            name, i = base, 2
            while name in known or name in callables:
                name, i = f"{base}_{i}", i + 1
            callables[name] = fn
            names.append(name)
        else:
            raise ValueError(f"{owner}(reward_funcs=...): {fn!r} is neither a function, a reward name nor a reward "
                             "model")
    return names, callables


def as_conversation(fn):
    """`fn` called as TRL calls it on conversational data: each completion as [{"role": "assistant", "content": ...}]
    (alignkit's rollout passes the completion text)."""
    import functools

    @functools.wraps(fn)  # keeps the name and (through __wrapped__) the signature, which says the columns it reads
    def wrapped(*args, completions, **kwargs):
        turns = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
        return fn(*args, completions=turns, **kwargs)

    return wrapped


TRAINER_KWARGS = ("trainer_state", "log_metric", "log_extra")


def with_trainer_kwargs(fn, trainer):
    """`fn` called with TRL's extra keywords where it takes them: trainer_state (the live TrainerState),
    log_metric(name, value) (its mean joins the next log row) and log_extra(column, values) (kept in
    trainer._logs["extra"]). Its signature, less those, still says the columns it reads."""
    import functools
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    wanted = [k for k in TRAINER_KWARGS if takes_all or k in sig.parameters]
    if not wanted:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        extra = {"trainer_state": trainer.state, "log_metric": trainer._log_metric, "log_extra": trainer._log_extra}
        return fn(*args, **kwargs, **{k: extra[k] for k in wanted})

    wrapped.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in wanted])
    return wrapped


def _conversational(ds) -> bool:
    if ds is None or "prompt" not in (getattr(ds, "column_names", None) or []):
        return False
    first = next(iter(ds), None)
    return first is not None and isinstance(first["prompt"], list)


def reward_tokenizers(given, names: list[str], owner: str) -> list:
    """TRL's reward_processing_classes (one per reward function; None where none is given): alignkit reads a reward
    model with the tokenizer saved beside it, so a given one must be that one (loaded from the model's folder)."""
    import os

    if given is None:
        return [None] * len(names)
    given = list(given) if isinstance(given, list | tuple) else [given]
    if len(given) != len(names):
        raise ValueError("The number of reward processing classes must match the number of reward functions.")
    for tokenizer, name in zip(given, names):
        if tokenizer is None or not name.startswith("model:"):
            continue  # TRL ignores it for a reward function
        source, model = getattr(tokenizer, "name_or_path", ""), name.removeprefix("model:")
        if source != model and os.path.abspath(source) != os.path.abspath(model):
            raise ValueError(f"{owner}(reward_processing_classes=...): alignkit reads a reward model with the "
                             f"tokenizer saved beside it ({model}); this one was loaded from {source!r}: save it with "
                             "the reward model, or pass reward_processing_classes=None")
    return given


def prompt_batches(args) -> dict[str, int]:
    """TRL's online trainers count completions in per_device_*_batch_size (a step samples per_device x
    gradient_accumulation_steps of them, in whole groups of num_generations); alignkit's count prompt rows, each
    sampled num_generations times. The same completions per step: per_device / num_generations rows per micro-batch,
    or, when a group spans micro-batches, the step's rows in one (the same completions, one accumulation step)."""
    g, per, steps = args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps
    if per * steps % g:
        raise ValueError(f"generation_batch_size ({per * steps}) must be divisible by num_generations ({g}).")
    train = ({"train.per_device_train_batch_size": per // g} if per % g == 0 else
             {"train.per_device_train_batch_size": per * steps // g, "train.gradient_accumulation_steps": 1})
    return {**train, "train.per_device_eval_batch_size": max(1, args.per_device_eval_batch_size // g)}


def _streamed_train_set(args, train_dataset, eval_dataset) -> bool:
    """TRL's rules for streamed (IterableDataset) data: dispatch_batches must not be set; a streamed train set is read
    by one dataloader worker (its groups stay together). True when the data streams."""
    import datasets

    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    streams = [d for d in (train_dataset, *evals) if isinstance(d, datasets.IterableDataset)]
    if streams and args.accelerator_config.dispatch_batches:
        raise ValueError("Iterable datasets require `dispatch_batches=False`, but it is set to `True` in "
                         "`accelerator_config`. Please set it to `False`.")
    if isinstance(train_dataset, datasets.IterableDataset) and args.dataloader_num_workers != 0:
        import logging

        logging.getLogger(__name__).warning(
            "Iterable datasets require `dataloader_num_workers=0` to preserve prompt grouping; overriding the "
            f"provided value ({args.dataloader_num_workers}).")
        args.dataloader_num_workers = 0
    return bool(streams)


def registered_rewards() -> list[str]:
    from alignkit.online import RewardRegistry

    return list(RewardRegistry.from_plugins(alignkit.get_plugin_manager()).functions)


class OnlineTrainer(FacadeTrainer):
    """TRL 1.16's online trainer constructor (GRPOTrainer's, RLOOTrainer's) on alignkit's engine and rollout.
    A subclass names `method_name`, `method_plugin`, `config_class` and `suffix` (TRL's default output_dir)."""

    method_name: str
    method_plugin: Any
    config_class: type
    suffix: str
    #: TRL's online trainers' log adds the step metrics not yet logged to the summary row after training too
    #: (FacadeTrainer.summary_has_step_metrics)
    summary_has_step_metrics = True

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers: tuple = (None, None), quantization_config=None, peft_config=None, tools=None,
                 rollout_func=None, environment_factory=None) -> None:
        cls = type(self)
        self.args = self._args(args, cls.config_class, f"{self._model_name(model).split('/')[-1]}-{cls.suffix}")
        self._refuse(quantization_config=(quantization_config, "load the quantized model yourself and pass it"),
                     tools=(tools, "tool calling is not supported"),
                     rollout_func=(rollout_func, "alignkit's rollout samples with the policy"),
                     environment_factory=(environment_factory, "environments are not supported"))
        streamed = _streamed_train_set(self.args, train_dataset, eval_dataset)
        if reward_funcs is None or reward_funcs == []:
            raise ValueError(f"{cls.__name__} needs reward_funcs: functions, alignkit reward names or a reward model")
        names, callables = reward_names(reward_funcs, set(registered_rewards()), cls.__name__)
        if _conversational(train_dataset):
            callables = {name: as_conversation(fn) for name, fn in callables.items()}
        callables = {name: with_trainer_kwargs(fn, self) for name, fn in callables.items()}
        a = self.args  # TRL keeps the last generation batch's log_extra values
        self._logs = {"extra": defaultdict(lambda: deque(maxlen=a.per_device_train_batch_size *
                                                         a.gradient_accumulation_steps * a.world_size))}
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        self.reward_func_names = names
        self.reward_processing_classes = reward_tokenizers(reward_processing_classes, names, cls.__name__)
        rewards = _Rewards(callables, self._forget_checks)
        self._start(cls.method_name, [cls.method_plugin, rewards], model, self.args, train_dataset, eval_dataset,
                    processing_class, None, callbacks, optimizers, peft_config,
                    overrides={"method.reward_funcs": names, **prompt_batches(self.args)})
        self.num_generations = self.args.num_generations
        self._given = {"train": train_dataset, "eval": eval_dataset}
        if streamed:  # (after the engine read the arguments: alignkit runs under accelerate launch's own config)
            self.args.accelerator_config.dispatch_batches = False

    # ---- the datasets as given: TRL's online trainers keep the prompt rows (no tokenized copy) -----------------

    @property
    def train_dataset(self):
        return self._given["train"]

    @property
    def eval_dataset(self):
        return self._given["eval"]

    def _loader(self, ds, batch_size: int):
        import datasets
        from torch.utils.data import DataLoader

        workers = 0 if isinstance(ds, datasets.IterableDataset) else self.args.dataloader_num_workers
        return DataLoader(ds, batch_size=batch_size, collate_fn=list, num_workers=workers)

    def get_train_dataloader(self):
        """The prompt rows in batches of rows (a stream read by one worker, as TRL keeps its groups)."""
        return self._loader(self.train_dataset, self.args.per_device_train_batch_size)

    def get_eval_dataloader(self, eval_dataset=None):
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError(f"{type(self).__name__}.get_eval_dataloader: no eval_dataset was given to the trainer "
                             "or here")
        return self._loader(ds, self.args.per_device_eval_batch_size)

    def _log_metric(self, name: str, value: float) -> None:
        """A reward function's metric: its mean over the calls since the last row joins the next log row."""
        self._stored_metrics["train" if self.is_in_train else "eval"][name].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        self._logs["extra"][column].extend(values)

    def _forget_checks(self) -> None:
        """At the start of training: what rewards logged while alignkit checked them on empty completions goes."""
        self._stored_metrics.clear()
        for values in self._logs["extra"].values():
            values.clear()
