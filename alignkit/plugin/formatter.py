"""The DataFormatter interface: a method's raw rows -> model-ready features -> padded batches."""

import inspect
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.blocks.text import prompt_token_ids
from alignkit.errors import DataError


class DropExample(Exception):
    """Raised by a formatter for an example that cannot be trained on (counted, not an error)."""


@dataclass
class Formatted:
    """One formatted example: model-ready features and whether truncation cut anything."""

    features: dict[str, Any]
    truncated: bool = False


def infer_token_fields(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """(ids feature, labels feature or None) pairs by naming convention: `X_input_ids` goes with
    `X_labels`, plain `input_ids` with `labels`."""
    names = list(names)
    fields = []
    for name in sorted(n for n in names if n.endswith("input_ids")):
        labels = name.removesuffix("input_ids") + "labels"
        fields.append((name, labels if labels in names else None))
    return fields


class DataFormatter(ABC):
    """Turns raw rows into model-ready features and collates them into batches.

    Built once per run as `formatter(method_config, tokenizer)`. `format` raises DataError for a
    malformed row (the core adds the file and row number) and DropExample for one to skip; it returns
    one Formatted, or a list of them when one raw row makes several examples.
    """

    def __init__(self, config: Any, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer

    #: processes for preprocessing; a formatter may take it from its config.
    num_proc: int | None = None
    #: the config fields this formatter reads (a MethodConfig subclass); a method that reuses the
    #: formatter by name gets them added to its own config.
    config_class: type | None = None

    #: the prompt starts with BOS whatever the tokenizer's own rules (TRL's preference trainers do so)
    bos_first: bool = False

    #: rows with images (an `images` column, alignkit.formatters.vision) are read; a formatter that does not read them
    #: is refused such rows rather than training on their text alone
    reads_images: bool = False

    def prompt_ids(self, prompt) -> list[int]:
        """The ids this formatter's examples hold before a completion of `prompt` (a string or a conversation):
        what `alignkit generate` and `chat` feed a model trained with it. `alignkit.blocks.text.prompt_token_ids` by
        default, which every formatter's prompt follows (declare `bos_first` rather than overriding this)."""
        return prompt_token_ids(self.tokenizer, prompt, self.bos_first)

    def sequence_ids(self, prompt, completion) -> list[int] | None:
        """The ids a model trained with this formatter reads for prompt + completion as one scored sequence (a reward
        model's rule, used by `model:PATH` rewards); None (the default): `prompt_ids` followed by the completion's ids
        and EOS."""
        return None

    def prepare_model(self, model) -> None:  # noqa: B027 (optional)
        """Called once with the unwrapped model before any data is formatted: read what the format depends
        on (e.g. whether the model is an encoder-decoder). Default: nothing."""

    @abstractmethod
    def format(self, example: dict[str, Any]) -> "Formatted | list[Formatted]":
        """Validate and tokenize one raw example: one Formatted, or a list (one row -> several examples)."""

    @abstractmethod
    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of formatted examples into a batch of tensors."""

    def check_data(self, dataset: Any, source: str, pm: Any = None, run: Any = None) -> None:  # noqa: B027
        """Called once with each raw split (a datasets.Dataset) before it is formatted, with the run's plugin manager
        and RunConfig (None where there is no run, as in `alignkit format`): checks that span rows, need other
        plugins' parts (e.g. the columns a reward reads) or other sections (the batch size); raise a DataError
        naming `source` or a ConfigError naming the key. Default: nothing."""

    def for_split(self, split: str) -> "DataFormatter":
        """The formatter that formats the `split` ("train" or "eval") rows: this one by default; a formatter whose
        config formats eval rows otherwise (e.g. unpacked) returns a copy set up for them. Its collate must take
        both splits' examples."""
        return self

    def format_batch(self, examples: list[dict[str, Any]]) -> list["Formatted | list[Formatted] | Exception"]:
        """`format` over many rows, in order: one result per row, a Formatted, a list of them, or the
        DropExample/DataError it raised. An empty list means the row's content is carried by another row's
        examples (packing): it is not counted as dropped. Override to tokenize a batch in one call (the results must
        equal `format`'s) or to use context across rows."""
        results: list[Formatted | list[Formatted] | Exception] = []
        for example in examples:
            try:
                results.append(self.format(example))
            except (DropExample, DataError) as e:
                results.append(e)
        return results

    def output_features(self) -> "Any | None":
        """The types of `format`'s features (a datasets.Features), if known: prepare() then skips datasets'
        type inference."""
        return None

    def token_fields(self) -> list[tuple[str, str | None]] | None:
        """(ids feature, labels feature or None) pairs that `alignkit format` shows. Default: inferred from
        the feature names (`X_input_ids` with `X_labels`, `input_ids` with `labels`); None when the names are
        known only from the formatted examples (then `alignkit format` infers them there)."""
        features = self.output_features()
        return infer_token_fields(features) if features is not None else None

    def describe(self, features: dict[str, Any]) -> list[str]:
        """Lines `alignkit format` shows for an example besides its tokens: by default each scalar feature (a bool
        or number, e.g. a label) as `name: value`."""
        return [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in features.items()
                if isinstance(v, (bool, int, float))]

    def length(self, features: dict[str, Any]) -> int:
        """The tokens an example costs in a batch (for train.group_by_length): by default its longest list."""
        return max((len(v) for v in features.values() if isinstance(v, list)), default=0)

    def fingerprint(self) -> str:
        """What the formatted data depends on, hashed: the source code of the formatter's classes, its public
        state, its config, the tokenizer. prepare() caches formatted datasets under it (with the raw data's
        fingerprint), so an edited formatter never serves data formatted by its old code."""
        from datasets.fingerprint import Hasher

        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        tokenizer_id = (type(tok).__qualname__, backend.to_str() if backend is not None else Hasher.hash(tok),
                        getattr(tok, "chat_template", None), str(getattr(tok, "special_tokens_map", None)))
        state = {k: v for k, v in vars(self).items() if k not in ("tokenizer", "config") and not k.startswith("_")}
        config = self.config.model_dump_json() if hasattr(self.config, "model_dump_json") else repr(self.config)
        return Hasher.hash((type(self).__module__, type(self).__qualname__, class_sources(type(self)),
                            repr(sorted(state.items())), config, tokenizer_id))


def class_sources(cls: type) -> list[str]:
    """The source code of every class in `cls`'s MRO, of the modules defining them (so that an edited helper
    function in a formatter's module counts too) and of the modules those use from alignkit* packages or from the
    formatter's own package (the core's text and token blocks, a plugin's helper module); a class's qualified name
    where no source is available (e.g. a class made at run time)."""
    sources, seen = [], set()
    for klass in cls.__mro__:
        if klass in (object, ABC):
            continue
        module = inspect.getmodule(klass)
        for part in (klass, module, *_modules_used(module)):
            if part is None or part in seen:
                continue
            seen.add(part)
            try:
                sources.append(inspect.getsource(part))
            except (OSError, TypeError):
                sources.append(f"{klass.__module__}.{klass.__qualname__}")
    return sources


def _modules_used(module) -> list:
    """The modules of alignkit* packages and of `module`'s own top-level package whose functions, classes or
    selves `module` imported."""
    if module is None:
        return []
    package = module.__name__.split(".")[0]
    used = set()
    for value in vars(module).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if (isinstance(name, str) and (name.startswith("alignkit") or name.split(".")[0] == package)
                and name != module.__name__ and name in sys.modules):
            used.add(name)
    return [sys.modules[name] for name in sorted(used)]
