"""Dataset loading (files, save_to_disk folders, the hub, plugins' built-in datasets), formatting with a
method's DataFormatter, the epoch sampler, and padding. DataFormatter itself lives in alignkit.plugin.formatter."""

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets.fingerprint import Hasher

from alignkit.errors import DataError
from alignkit.formatters.vision import holds_images, resolve_paths
from alignkit.plugin.formatter import DataFormatter, DropExample

log = logging.getLogger(__name__)

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_STATUS = "__alignkit_truncated"
_ROW = "__alignkit_row"
_MERGED = "__alignkit_merged"  # rows of the batch whose examples another row carries (packing): not dropped


@dataclass
class PrepareReport:
    """kept: examples made (a formatter may make several of one row); truncated: examples cut;
    dropped: raw rows that made no example (a row whose examples another row carries, as in packing, is not dropped)."""

    kept: int
    truncated: int
    dropped: int


BUILTIN_SPLITS = ("train", "test")


def cache_dir(*parts: str) -> Path:
    """alignkit's own cache folder ($XDG_CACHE_HOME/alignkit, by default ~/.cache/alignkit), or a folder in it: every
    file alignkit caches goes here, never next to the user's data."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "alignkit", *parts)


def load_data(spec: str, split: str, builtins: Mapping[str, tuple[Callable, str]] | None = None) -> datasets.Dataset:
    """Load `spec`: `builtin:NAME`, a .jsonl/.json/.parquet/.csv file, a save_to_disk folder, or a hub name.

    `builtins` maps the names of built-in datasets to (loader, plugin) as the `register_datasets` hook
    registers them; by default those of the installed plugins."""
    if spec.startswith("builtin:"):
        ds = _load_builtin(spec, split, builtins)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            ds = _load_from_disk(path, split)
        elif path.suffix in FILE_LOADERS:
            ds = resolve_paths(_load_file(path), path.parent)  # image paths are relative to the data file
        elif path.exists():
            raise DataError(f"{spec}: unsupported file type; use one of {', '.join(FILE_LOADERS)}")
        else:
            ds = _load_hub(spec, split)
    if len(ds) == 0:
        raise DataError(f"{spec}: the dataset is empty")
    return ds


def _load_builtin(spec: str, split: str, builtins: Mapping[str, tuple[Callable, str]] | None) -> datasets.Dataset:
    if builtins is None:
        from alignkit.plugins import get_plugin_manager, registered_datasets

        builtins = registered_datasets(get_plugin_manager())
    name = spec.removeprefix("builtin:")
    if name not in builtins or split not in BUILTIN_SPLITS:
        raise DataError(f"unknown built-in dataset {spec!r} split {split!r}; choose from "
                        f"{', '.join('builtin:' + n for n in sorted(builtins)) or 'none (no plugin registers one)'} "
                        f"with split {' or '.join(BUILTIN_SPLITS)}")
    loader, source = builtins[name]
    ds = loader(split)
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{spec}: the loader registered by {source} returned {type(ds).__name__}, not a "
                        "datasets.Dataset")
    return ds


def _load_from_disk(path: Path, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with Dataset.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    return ds


def _load_file(path: Path) -> datasets.Dataset:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0 or not path.read_bytes()[:4096].strip():
        raise DataError(f"{path}: the dataset is empty")
    if path.suffix in (".jsonl", ".json", ".csv"):
        _check_utf8(path)
    if path.suffix == ".jsonl":
        _check_jsonl(path)
    try:
        with quiet_hub():
            return datasets.load_dataset(FILE_LOADERS[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        cause = e.__cause__ or e.__context__ or e  # datasets wraps the reader's own error
        first = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), "")
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]}: {type(cause).__name__}: {first}") from None


def _check_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8 (the readers fail with a traceback otherwise)."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {line[e.start]:#x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None


def _check_jsonl(path: Path) -> None:
    """Name the first line that is not a JSON object (datasets' own error names none)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(value).__name__}")


def _load_hub(name: str, split: str) -> datasets.Dataset:
    if "/" not in name or name.startswith((".", "/", "~")):
        raise DataError(f"{name}: no such file or directory (and not a hub dataset name 'owner/name')")
    try:
        with quiet_hub():
            return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, missing, gated, bad split ...
        raise DataError(f"{name}: no such local file or folder, and it cannot be loaded from the Hugging Face "
                        f"hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


@contextlib.contextmanager
def quiet_hub():
    """No retry or warning lines from the hub clients: a failure ends as one DataError line."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "urllib3", "httpx", "filelock")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def prepare(ds: datasets.Dataset, formatter: DataFormatter, source: str, pm=None, run=None
            ) -> tuple[datasets.Dataset, PrepareReport]:
    """Check the split (the formatter's `check_data`, with the plugin manager `pm` and the RunConfig `run`), format
    every row in batches; drop
    the rows the formatter drops; count truncated and dropped rows.

    The result is cached by datasets under the raw data's fingerprint and the formatter's: a second run on
    the same file with the same settings reads it back instead of tokenizing again.
    """

    def format_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]
        out: dict[str, list] = {}
        results = formatter.format_batch(rows)
        merged = sum(isinstance(r, list) and not r for r in results)
        for index, result in zip(indices, results):
            if isinstance(result, DropExample):
                continue
            if isinstance(result, DataError):
                raise DataError(f"{source}, row {index}: {result}") from None
            if isinstance(result, Exception):
                raise result
            for example in result if isinstance(result, list) else [result]:  # one row may make several
                for k, v in {**example.features, _STATUS: example.truncated, _ROW: index, _MERGED: merged}.items():
                    out.setdefault(k, []).append(v)
                merged = 0
        return out

    from alignkit import __version__

    if holds_images(ds) and not formatter.reads_images:
        name = f"the {run.method.name} method's" if run is not None else "the"
        raise DataError(f"{source}: the rows have images, and {name} formatter ({type(formatter).__name__}) does not "
                        "read them: it would train on the text alone; use a method whose formatter reads images "
                        "(reads_images) or drop the 'images' column")
    formatter.check_data(ds, source, pm, run)
    n = len(ds)
    fingerprint = Hasher.hash((ds._fingerprint, formatter.fingerprint(), __version__))
    features = formatter.output_features()
    if features is not None:
        features = datasets.Features({**features, _STATUS: datasets.Value("bool"), _ROW: datasets.Value("int64"),
                                      _MERGED: datasets.Value("int64")})
    cache = None
    if ds.cache_files:  # datasets would write its cache next to the data (a save_to_disk folder: the user's own)
        cache = cache_dir("formatted") / f"cache-{fingerprint}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)
    formatted = ds.map(
        format_batch, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
        cache_file_name=None if cache is None else str(cache),
        num_proc=formatter.num_proc if formatter.num_proc and formatter.num_proc > 1 else None,
        desc=f"formatting {source}", new_fingerprint=fingerprint,
    )
    if len(formatted) == 0:
        raise DataError(f"{source}: every one of the {n} examples was dropped by the formatter: none has a trained "
                        "token left after truncation (check method.max_length)")
    rows_kept = len(set(formatted[_ROW])) + sum(formatted[_MERGED])
    report = PrepareReport(kept=len(formatted), truncated=sum(formatted[_STATUS]), dropped=n - rows_kept)
    return formatted.remove_columns([_STATUS, _ROW, _MERGED]), report


def load_splits(train: str, train_split: str, eval: str | None, eval_split: str, eval_fraction: float | None,
                seed: int, builtins: Mapping[str, tuple[Callable, str]] | None = None
                ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The raw train set and the eval set (given, held out from train, or none)."""
    train_ds = load_data(train, train_split, builtins)
    if eval is not None:
        return train_ds, load_data(eval, eval_split, builtins)
    if eval_fraction is not None:
        names = {}
        if train_ds.cache_files:  # datasets would write the index files next to the data (the user's folder)
            folder = cache_dir("splits")
            folder.mkdir(parents=True, exist_ok=True)
            key = Hasher.hash((train_ds._fingerprint, eval_fraction, seed))
            names = {f"{s}_indices_cache_file_name": str(folder / f"cache-{key}-{s}.arrow") for s in ("train", "test")}
        split = train_ds.train_test_split(test_size=eval_fraction, seed=seed, **names)
        return split["train"], split["test"]
    return train_ds, None


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order.

    With `lengths`, the shuffle is grouped by length (train.group_by_length): the shuffled indices are cut
    into mega-batches of `group` micro-batches, each sorted longest first, so a micro-batch holds examples of
    similar length and pads little; the mega-batch with the longest example comes first (memory errors show
    at once). Still a function of (seed, epoch) alone.
    """

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1,
                 group: int = 50) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.mega = lengths, batch_size * group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        megas = [sorted(order[s:s + self.mega], key=lambda i: -self.lengths[i]) for s in range(0, self.n, self.mega)]
        longest = max(range(len(megas)), key=lambda m: self.lengths[megas[m][0]])
        megas.insert(0, megas.pop(longest))
        return iter([i for mega in megas for i in mega])

