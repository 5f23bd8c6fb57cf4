"""A run's data: the raw train and eval sets (given, or loaded as the config says), formatted once, and
their loaders."""

import functools
import logging

from torch.utils.data import DataLoader

from alignkit.config import RunConfig, train_data
from alignkit.engine.data import EpochSampler, load_data, load_splits, prepare
from alignkit.engine.reference import collate_with_reference
from alignkit.plugins import registered_datasets

log = logging.getLogger(__name__)


class RunData:
    """Raw sets (passed in or loaded lazily), their formatted versions (cached per raw set) and loaders.
    `reports` receives each split's PrepareReport (the run state's `data`)."""

    def __init__(self, config: RunConfig, formatter, collate_fn, accelerator, pm, reports: dict,
                 train_dataset=None, eval_dataset=None) -> None:
        self.config, self.formatter, self.collate_fn, self.accelerator = config, formatter, collate_fn, accelerator
        self.pm, self.reports = pm, reports
        self.raw = {"train": train_dataset, "eval": eval_dataset}
        self._formatted: dict[str, tuple] = {}  # split -> (raw dataset, formatted dataset)
        self._builtins = None  # the plugins' built-in datasets, looked up when the config names one

    def builtins(self) -> dict:
        if self._builtins is None:
            self._builtins = registered_datasets(self.pm)
        return self._builtins

    def formatted(self, need_train: bool) -> dict:
        """Formatted `train` (when training) and `eval` sets; evaluation alone falls back to train."""
        d = self.config.data
        if self.raw["train"] is None and (need_train or (self.raw["eval"] is None and d.eval is None)):
            self.raw["train"], eval_ds = load_splits(train_data(self.config), d.train_split, d.eval, d.eval_split,
                                                     d.eval_fraction, self.config.train.seed, self.builtins())
            self.raw["eval"] = self.raw["eval"] if self.raw["eval"] is not None else eval_ds
        elif self.raw["eval"] is None and d.eval is not None:
            self.raw["eval"] = load_data(d.eval, d.eval_split, self.builtins())
        wanted = {"train": (self.raw["train"], d.max_train_samples, d.train)} if need_train else {}
        wanted["eval"] = (self.raw["eval"], d.max_eval_samples, d.eval or d.train)
        if not need_train and self.raw["eval"] is None:
            wanted["eval"] = (self.raw["train"], d.max_eval_samples, d.train)
        out = {}
        for split, (ds, limit, source) in wanted.items():
            if ds is None:
                continue
            if self._formatted.get(split, (None,))[0] is ds:  # formatted already (evaluate() may run often)
                out[split] = self._formatted[split][1]
                continue
            raw = ds
            ds = ds.select(range(min(limit, len(ds)))) if limit else ds
            with self.accelerator.main_process_first():
                out[split], report = prepare(ds, self.formatter.for_split(split), f"{split} data ({source})", self.pm,
                                             self.config)
            self._formatted[split] = (raw, out[split])
            self.reports[split] = report
            if report.dropped or report.truncated:
                log.warning("%s data: %d examples kept, %d truncated%s", split, report.kept, report.truncated,
                            f", {report.dropped} dropped (nothing left to train on after truncation)"
                            if report.dropped else "")
        return out

    def loader(self, ds, batch_size: int, shuffle: bool) -> DataLoader:
        """Batches of `ds` collated by the method (with precomputed reference outputs); shuffled by
        (seed, epoch), grouped by length with train.group_by_length."""
        t = self.config.train
        lengths = None
        if shuffle and t.group_by_length:
            lengths = [self.formatter.length(dict(zip(batch, row))) for batch in ds.iter(batch_size=1000)
                       for row in zip(*batch.values())]
        sampler = EpochSampler(len(ds), t.seed, lengths, batch_size) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, sampler=sampler,
                          collate_fn=functools.partial(collate_with_reference, self.collate_fn),
                          num_workers=t.dataloader_num_workers)

    def step_batches(self, train_dl, state):
        """Yield the micro-batches of each optimizer step, epoch after epoch, from the resume point (`state`'s
        epoch_index and batches_in_epoch, which this advances)."""
        ga = self.config.train.gradient_accumulation_steps
        while state.step < state.max_steps:  # resumed from a checkpoint of the last step: nothing left
            train_dl.set_epoch(state.epoch_index)
            skip = state.batches_in_epoch
            batches = self.accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            micro_batches = []
            for batch in batches:
                micro_batches.append(batch)
                state.batches_in_epoch += 1
                if len(micro_batches) == ga:
                    yield micro_batches
                    micro_batches = []
            if micro_batches:
                yield micro_batches
            state.epoch_index, state.batches_in_epoch = state.epoch_index + 1, 0
