"""TRLColumns: a TRL-style trainer's tokenized rows shown under TRL's own column names too.

TRL's trainers tokenize into their own columns (e.g. prompt_ids / chosen_ids / rejected_ids) and TRL users and
tests read them from `trainer.train_dataset` / `trainer.eval_dataset`. A trainer mixes this in before
FacadeTrainer and defines `trl_columns(row) -> dict`; the rows it shows gain those columns (the engine still trains
on the raw rows behind them), and each dataset of a dict of eval datasets is shown tokenized.
"""


class TRLColumns:
    @staticmethod
    def trl_columns(row: dict) -> dict:
        raise NotImplementedError

    def _tokenized(self, ds, *args):
        named = self.__dict__.setdefault("_trl_named", {})  # id(tokenized) -> (tokenized, with TRL's columns)
        if ds is None or any(view is ds for _, view in named.values()):
            return ds
        tokenized = super()._tokenized(ds, *args)
        if tokenized is None or not len(tokenized):
            return tokenized
        if id(tokenized) not in named:
            named[id(tokenized)] = (tokenized, tokenized.map(self.trl_columns))
        return named[id(tokenized)][1]

    def _raw_of(self, ds):
        for tokenized, view in self.__dict__.get("_trl_named", {}).values():
            if view is ds:
                ds = tokenized
        return super()._raw_of(ds)

    @property
    def eval_dataset(self):
        ds = super().eval_dataset
        return {name: self._tokenized(d) for name, d in ds.items()} if isinstance(ds, dict) else ds
