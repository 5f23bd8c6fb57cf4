"""Reward functions for online methods: found by name among the plugins, scored with checks.

A plugin registers rewards with the `register_rewards(register)` hook: `register(name, fn)`, where
`fn(prompts, completions, **row_columns) -> list[float | None]` gets the prompts and completions as text
(one entry per completion, each prompt repeated for its samples) and every other column of the prompt
rows (e.g. `answer=[...]`), and returns one reward per completion (None: not applicable to that one). `fn` may be
a coroutine function (`async def`, as TRL allows): the async rewards of a scoring call are awaited concurrently.
A config selects rewards by name; `model:PATH` uses a sequence-classification checkpoint as a reward. The core
registers the common rewards itself (alignkit.online.common_rewards: exact-match, regex-match, length-penalty).

Public: `RewardRegistry` (the rewards by name), `score` (every reward of a batch, checked), `call_reward` (one
reward, checked: one finite number or None per completion, the reward named in any error), `check_data`.
"""

import asyncio
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from alignkit.blocks.tokens import pad_right, with_bos, with_eos
from alignkit.errors import AlignkitError, ConfigError, DataError, PluginError, did_you_mean
from alignkit.online.judge import JUDGE_PREFIX, JudgeReward
from alignkit.online.remote_rewards import URL_PREFIX, RemoteReward

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]
MODEL_PREFIX = "model:"
PREFIXES = (MODEL_PREFIX, URL_PREFIX, JUDGE_PREFIX)  # configured names with these are not registered names


class RewardRegistry:
    """Reward functions by name, and which plugin distribution registered each."""

    def __init__(self, pm=None, settings=None) -> None:
        self.functions: dict[str, tuple[RewardFn, str]] = {}
        self.pm = pm  # the plugins a `model:PATH` reward's training run is read with (its method's formatter)
        self.settings = settings  # the run's `rewards:` block (alignkit.config.RewardsConfig; None: its defaults)

    @classmethod
    def from_plugins(cls, pm, settings=None) -> "RewardRegistry":
        """The core's common rewards (alignkit.online.common_rewards), then every plugin's."""
        from alignkit.online.common_rewards import COMMON

        registry = cls(pm, settings)
        for name, fn in COMMON.items():
            registry.add(name, fn, "alignkit")
        for impl in pm.hook.register_rewards.get_hookimpls():
            source = getattr(pm, "sources", {}).get(impl.plugin_name, (impl.plugin_name, ""))[0]
            impl.function(register=lambda name, fn, s=source: registry.add(name, fn, s))
        return registry

    def add(self, name: str, fn: RewardFn, source: str = "") -> None:
        if not callable(fn):
            raise PluginError(f"plugin {source} registered reward {name!r} as {type(fn).__name__}, not a function")
        if name in self.functions:
            raise PluginError(f"reward {name!r} is registered twice: by {self.functions[name][1]} and by {source}")
        if name.startswith(PREFIXES):
            raise PluginError(f"plugin {source}: reward names may not start with {', '.join(map(repr, PREFIXES))} "
                              f"({name!r})")
        self.functions[name] = (fn, source)

    def select(self, names: Sequence[str], key: str = "method.reward_funcs") -> list[tuple[str, RewardFn]]:
        """(name, function) for each configured name; `model:PATH` loads that reward model, `url:URL` is a remote
        reward (alignkit.online.remote_rewards), `judge:MODEL` an LLM judge (alignkit.online.judge)."""
        out = []
        for name in names:
            if name.startswith(URL_PREFIX):
                out.append((name, RemoteReward(name, self.settings)))
            elif name.startswith(JUDGE_PREFIX):
                out.append((name, JudgeReward(name, self.settings)))
            elif name.startswith(MODEL_PREFIX):
                require_classifier(name.removeprefix(MODEL_PREFIX), key)
                out.append((name, RewardModel(name.removeprefix(MODEL_PREFIX), pm=self.pm)))
            elif name in self.functions:
                out.append((name, self.functions[name][0]))
            else:
                known = ", ".join(sorted(self.functions)) or "none"
                raise ConfigError(f"{key}: no reward function {name!r}{did_you_mean(name, self.functions)}; "
                                  f"registered: {known}, or model:PATH for a reward model, url:URL for a remote one, "
                                  "judge:MODEL for an LLM judge")
        return out


def columns_read(fn: RewardFn) -> list[str]:
    """The row columns a reward function names as parameters (besides prompts and completions) with no default: the
    data must have each. A parameter with a default is optional (TRL passes every column as a keyword)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in ("prompts", "completions")
            and p.default is p.empty]


def _lacks(name: str, column: str, columns) -> str:
    have = ", ".join(repr(c) for c in sorted(columns)) or "none"
    return (f"reward {name!r} reads column {column!r}, which the data lacks; it has: {have} (add the column, or "
            "choose other method.reward_funcs)")


def _start(name: str, fn: RewardFn, prompts: list, completions: list, columns: dict[str, list]):
    """`fn` called on the batch (the columns it names checked first): its values, or an awaitable (a coroutine
    function's call) that gives them."""
    for column in columns_read(fn):
        if column not in columns:
            raise PluginError(_lacks(name, column, {"prompt", *columns}))
    try:
        return fn(prompts=prompts, completions=completions, **columns)
    except KeyError as e:  # a function reading **columns by key
        raise _missing(name, e, columns) from None


def _missing(name: str, e: KeyError, columns: dict) -> Exception:
    key = e.args[0] if len(e.args) == 1 else None
    return PluginError(_lacks(name, key, {"prompt", *columns})) if isinstance(key, str) and key not in columns else e


async def _finish(name: str, pending, columns: dict):
    try:
        return await pending
    except KeyError as e:
        raise _missing(name, e, columns) from None


def run_async(awaitables: list) -> list:
    """The results of `awaitables`, run concurrently on one event loop made for this call and closed after it (so
    none is left behind; any thread may call this). Inside a running loop (a notebook) the new loop runs in a
    thread of its own."""
    async def gather():
        return await asyncio.gather(*awaitables)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with ThreadPoolExecutor(1, thread_name_prefix="alignkit-rewards") as pool:
        return pool.submit(asyncio.run, gather()).result()


def call_reward(name: str, fn: RewardFn, prompts: list, completions: list, columns: dict[str, list]) -> list:
    """`fn`'s rewards, one number or None per completion (a coroutine function is awaited); a PluginError naming the
    reward when it reads a column the data lacks or returns anything else."""
    values = _start(name, fn, prompts, completions, columns)
    if inspect.isawaitable(values):
        values = run_async([_finish(name, values, columns)])[0]
    return _checked(name, values, prompts, completions)


def _checked(name: str, values, prompts: list, completions: list) -> list:
    if hasattr(values, "tolist") and getattr(values, "ndim", 0) > 0:  # a tensor or an array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise PluginError(f"reward {name!r} returned {type(values).__name__} {str(values)[:40]}, not a list; return "
                          f"one reward per completion ({len(completions)} here, None where it does not apply)")
    if len(values) != len(completions):
        raise PluginError(f"reward {name!r} returned {len(values)} rewards for {len(completions)} completions; "
                          "return one per completion (None where it does not apply)")
    return [None if v is None else _number(name, v, i, prompts, completions) for i, v in enumerate(values)]


def _number(name: str, v, i: int, prompts: list, completions: list) -> float:
    try:
        v = float(v)
    except OverflowError:
        digits = len(str(v))
        raise PluginError(f"reward {name!r} returned an integer too large for a float ({str(v)[:12]}..., "
                          f"{digits} digits) for row {i} (prompt {prompts[i]!r}); rewards must be finite") from None
    except (TypeError, ValueError):
        raise PluginError(f"reward {name!r} returned {v!r} for row {i} (prompt {prompts[i]!r}); "
                          "rewards are numbers or None") from None
    if not math.isfinite(v):
        raise PluginError(f"reward {name!r} returned {v} for row {i} (prompt {prompts[i]!r}, completion "
                          f"{completions[i]!r}); rewards must be finite (None where it does not apply)")
    return v


def score(functions: list[tuple[str, RewardFn]], prompts: list[str], completions: list[str],
          columns: dict[str, list]) -> torch.Tensor:
    """Rewards [completions, functions] (float32, NaN where a function returned None). The async rewards (coroutine
    functions) are awaited concurrently, on one event loop for this call (`run_async`).

    A function that reads a column the data lacks, returns something other than one number (or None) per completion,
    or a NaN/inf reward, is an error naming it (and the row)."""
    out = torch.full((len(completions), len(functions)), float("nan"))
    values, pending = {}, {}
    try:
        for j, (name, fn) in enumerate(functions):
            v = _start(name, fn, prompts, completions, columns)
            (pending if inspect.isawaitable(v) else values)[j] = v
    except BaseException:
        for v in pending.values():  # never awaited: closed, so no warning follows the error
            getattr(v, "close", lambda: None)()
        raise
    if pending:  # the async rewards (coroutine functions, remote rewards) all at once
        values.update(zip(pending, run_async([_finish(functions[j][0], v, columns) for j, v in pending.items()])))
    for j, (name, _) in enumerate(functions):
        for i, v in enumerate(_checked(name, values[j], prompts, completions)):
            if v is not None:
                out[i, j] = v
    unscored = torch.isnan(out).all(1).nonzero().flatten().tolist() if functions else []
    if unscored:  # as TRL warns: such a completion has no reward (NaN), so no advantage
        i = unscored[0]
        row = {"prompt": prompts[i], "completion": completions[i], **{k: v[i] for k, v in columns.items()}}
        log.warning(f"All reward functions returned None for the following kwargs: {row} ({len(unscored)} of "
                    f"{len(completions)} completions here). Please ensure that at least one reward function returns "
                    "a valid reward.")
    return out


def check_data(functions: list[tuple[str, RewardFn]], dataset, source: str, probe: int = 4) -> None:
    """Before training: every column each reward reads is in `dataset` (prompt rows), and each reward function (not
    a reward model, a remote reward or a judge: `probe_before_training = False`) returns what `score` accepts for the
    first `probe` rows with empty completions. A DataError
    naming the data and the reward otherwise."""
    for name, fn in functions:
        for column in columns_read(fn):
            feature = dataset.features.get(column)
            if getattr(feature, "dtype", None) == "null":  # datasets' type of a column that is null in every row
                raise DataError(f"{source}: reward {name!r} reads column {column!r}, which is null in every row; fill "
                                "it in, or choose other method.reward_funcs")
    rows = dataset.select(range(min(probe, len(dataset))))[:]
    prompts = rows.pop("prompt", [""] * len(next(iter(rows.values()), [])))
    for name, fn in functions:
        if not getattr(fn, "probe_before_training", True):  # a reward model, a remote reward: no call before training
            continue
        try:
            call_reward(name, fn, prompts, [""] * len(prompts), rows)
        except (PluginError, DataError) as e:  # a reward refusing a row's value (e.g. a bad pattern) as well
            raise DataError(f"{source}: {e}") from None
        except Exception:  # noqa: S110 (the function's own failure on an empty completion: training reports it)
            pass


class RewardModel:
    """A sequence-classification checkpoint as a reward: the first logit of prompt + completion.

    A model trained by alignkit (its folder has the run's config.yaml) reads each text exactly as its formatter
    produced the training rows: the formatter's own `sequence_ids(prompt, completion)` where it has one (a reward
    model's formatter that tokenizes each sequence whole), else the prompt's special tokens as that formatter puts
    them (BOS first for the preference formatters), the chat template for conversations, and EOS after the
    completion. Any other checkpoint reads the
    text as its tokenizer encodes it without special tokens (a conversation with its chat template), as TRL does."""

    probe_before_training = False  # check_data does not run it

    def __init__(self, path: str, batch_size: int = 32, pm=None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if (Path(path) / "adapter_config.json").is_file():  # a LoRA run's folder: its base with the adapter
                self.model = _merged_adapter(Path(path), self.tokenizer, pm).eval()
            else:
                require_classifier(path)
                self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        except ConfigError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"method.reward_funcs: model:{path} is not a loadable sequence-classification "
                              f"checkpoint ({first})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.trained = _trained_formatter(Path(path), self.tokenizer, pm)

    def _text(self, prompt, completion) -> str:
        """prompt + completion as the reward model reads it: a conversation (a list of messages) with the completion
        as the assistant's turn is rendered with the reward model's chat template, as TRL does."""
        if isinstance(prompt, str):
            return prompt + (completion if isinstance(completion, str) else completion[-1]["content"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"method.reward_funcs: the reward model's tokenizer ({self.tokenizer.name_or_path}) has "
                              "no chat template, so it cannot read conversational prompts")
        turn = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(list(prompt) + turn, tokenize=False)

    def ids(self, prompt, completion) -> list[int]:
        """The token ids the reward model scores for prompt + completion."""
        own = None if self.trained is None else self.trained.sequence_ids(prompt, completion)
        if own is not None:  # the trained formatter's own rule for a whole scored sequence
            return list(own)
        text, tok = self._text(prompt, completion), self.tokenizer
        if self.trained is None:
            return tok(text, add_special_tokens=False)["input_ids"]
        bos_first = bool(getattr(self.trained, "bos_first", False))
        if isinstance(prompt, str):  # the formatter's own rule for a string prompt (`prompt_token_ids`)
            ids = tok(text, add_special_tokens=not bos_first)["input_ids"]
        else:  # the chat template writes its own special tokens
            ids = tok(text, add_special_tokens=False)["input_ids"]
        return with_eos(with_bos(list(ids), tok.bos_token_id) if bos_first else list(ids), tok.eos_token_id)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        rows = [self.ids(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                ids = pad_right(batch, self.tokenizer.pad_token_id).to(device)
                mask = pad_right([[1] * len(r) for r in batch], 0).to(device)
                out += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return out


def _merged_adapter(path: Path, tokenizer, pm):
    """A LoRA adapter folder of an alignkit run as its base classifier with the adapter (and the trained head) merged
    in, the base rebuilt as that run built it (its model settings and seed, from its config.yaml)."""
    from alignkit import load_model  # the host's loader (a lazy import: online/ sits below it)
    from alignkit.api import load_config

    saved = path / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"method.reward_funcs: model:{path} is a LoRA adapter without the config.yaml of the run "
                          "that trained it; merge it into its base model first (or give the run's folder)")
    try:
        cfg, method = load_config(None, str(saved), plugins=pm)
    except AlignkitError as e:
        raise ConfigError(f"method.reward_funcs: model:{path}: cannot tell from {saved} how it was trained ({e}); "
                          "install the plugin that trained it") from None
    model = cfg.model.model_copy(update={"name_or_path": str(path), "peft": None})
    return load_model(model, tokenizer, cfg.train.seed, "sequence-classifier", method.num_labels)


def _trained_formatter(path: Path, tokenizer, pm):
    """The formatter of the alignkit run that trained the model in `path` (from its config.yaml), or None for a
    model trained elsewhere; a config.yaml that cannot be read here is a ConfigError (scoring would silently
    differ from training)."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return None
    from alignkit.api import load_config  # the host's config reader (a lazy import: online/ sits below it)

    try:
        cfg, method = load_config(None, str(saved), plugins=pm)
        return method.formatter(cfg.method, tokenizer)
    except AlignkitError as e:
        raise ConfigError(f"method.reward_funcs: model:{path}: cannot tell from {saved} how it was trained ({e}); "
                          "install the plugin that trained it") from None


def require_classifier(path: str, key: str = "method.reward_funcs") -> None:
    """A ConfigError unless the checkpoint at `path` declares a sequence-classification architecture (a causal LM
    would load with a freshly initialised, random score head and reward noise). A folder without a readable config
    (a LoRA adapter, a missing path) is left to the loader, which says what is wrong with it."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except Exception:
        return
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"{key}: model:{path} is a {architectures[0]}, not a sequence classifier: its score head "
                          "would be random (give a trained reward model: a sequence-classification checkpoint with "
                          "one label)")
