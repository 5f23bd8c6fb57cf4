"""The frozen reference model that a loss may declare it needs (Loss.needs_reference_model)."""

import contextlib
import copy

import torch

from alignkit.engine.modeling import load_model
from alignkit.errors import ConfigError
from alignkit.plugin.context import call

PREFIX = "__ref_"


class Reference:
    """Builds the reference once and computes the loss's reference outputs for a batch.

    The reference is `model.ref_name_or_path` when given (with or without LoRA on the policy), else, for a
    PEFT policy, the policy itself with its adapters disabled (no second copy), else a frozen copy of the
    policy's initial weights. With `model.ref_offload` a loaded reference keeps its weights in CPU memory and visits
    the device only for its own forwards."""

    def __init__(self, loss, policy, config, tokenizer, accelerator) -> None:
        self.loss, self.accelerator, self.model, self.offload = loss, accelerator, None, False
        name = config.model.ref_name_or_path
        self.sync = loss.reference_sync if loss.needs_reference_model else None
        if self.sync is not None and hasattr(policy, "disable_adapter"):  # adapters: other parameters than a reference
            raise ConfigError("model.peft: this method mixes the policy's weights into its reference model "
                              "(Loss.reference_sync), which needs full fine-tuning; remove model.peft")
        if self.sync is not None and config.model.ref_offload:  # a synced reference is checkpointed with the run
            raise ConfigError("model.ref_offload: this method mixes the policy's weights into its reference model "
                              "(Loss.reference_sync), which then stays on the device to be saved in each checkpoint; "
                              "remove model.ref_offload")
        if not loss.needs_reference_model or (hasattr(policy, "disable_adapter") and not name):
            return
        if name:
            ref = load_model(config.model.model_copy(update={"name_or_path": name, "peft": None}), tokenizer,
                             config.train.seed)
        else:
            ref = copy.deepcopy(policy)
        ref.eval().requires_grad_(False)
        loss.prepare_reference(ref, policy)
        self.offload = config.model.ref_offload  # kept in CPU memory, on the device only for its own forwards
        self.model = ref.to("cpu") if self.offload else accelerator.prepare_model(ref, evaluation_mode=True)

    def after_step(self, policy, step: int) -> None:
        """After optimizer step `step`: with the loss's `reference_sync` (k, alpha), every k steps the reference
        becomes alpha * policy + (1 - alpha) * reference, parameter by parameter."""
        if self.sync is None or step % self.sync[0]:
            return
        alpha = self.sync[1]
        ref, policy = self.accelerator.unwrap_model(self.model), self.accelerator.unwrap_model(policy)
        with torch.no_grad():
            for r, p in zip(ref.parameters(), policy.parameters(), strict=True):
                r.mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)

    @property
    def precomputed(self) -> bool:
        """The loss asks for its reference outputs once, before training, instead of every step."""
        return self.loss.needs_reference_model and self.loss.precompute_reference

    def for_generation(self, policy) -> dict:
        """{"reference": (model, adapters_off)} for the generation handle when the loss has a reference: the loaded
        reference, or the PEFT policy with its adapters disabled; {} otherwise."""
        if not self.loss.needs_reference_model:
            return {}
        return {"reference": (self.model, False) if self.model is not None else (policy, True)}

    def __call__(self, policy, batch: dict, ctx=None) -> dict | None:
        """Precomputed outputs from the batch, or the reference (or adapter-free policy) run on it."""
        if not self.loss.needs_reference_model:
            return None
        if "__ref" in batch:
            return batch.pop("__ref")
        with torch.no_grad():
            if self.model is not None:
                with self.on_device():
                    return call(self.loss.reference, self.model, batch, ctx=ctx)
            with self.accelerator.unwrap_model(policy).disable_adapter():
                return call(self.loss.reference, policy, batch, ctx=ctx)

    @contextlib.contextmanager
    def on_device(self):
        """The reference on the run's device for the duration (with model.ref_offload: moved there and back to CPU
        memory, so that the policy's forward and backward never share the device with it)."""
        if not self.offload:
            yield
            return
        self.model.to(self.accelerator.device)
        try:
            yield
        finally:
            self.model.to("cpu")

    def precompute(self, ds, policy, collate, batch_size: int, context=None):
        """`ds` with the reference outputs of every example added as `__ref_*` columns (once, in order).
        `context(index, count)` makes the StepContext of each batch (for a `reference` that takes `ctx`).

        An output may be a row scalar [B] or a per-token tensor [B, T, ...] along the batch's right-padded sequences:
        each row's values are stored trimmed to that row's own length (see `trim_rows`), and padded back with zeros
        to the width of each training batch (`collate_with_reference`)."""
        columns: dict[str, list] = {}
        starts = range(0, len(ds), batch_size)
        for index, start in enumerate(starts):
            rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            batch = {k: v.to(self.accelerator.device) for k, v in collate(rows).items()}
            ctx = context(index, len(starts)) if context is not None else None
            for key, value in self(policy, batch, ctx).items():
                columns.setdefault(PREFIX + key, []).extend(trim_rows(value, rows))
        for key, values in columns.items():
            ds = ds.add_column(key, values)
        return ds


def row_length(row: dict) -> int:
    """A formatted example's length: its longest token list (what its batch is right-padded to)."""
    return max((len(v) for v in row.values() if isinstance(v, list)), default=0)


def trim_rows(value: torch.Tensor, rows: list[dict]) -> list:
    """Each row's value: a scalar, or the per-token values [T, ...] trimmed to the row's own length. The time axis
    (dim 1) may be offset from the batch's padded length by a constant (e.g. T - 1 for shifted log-probs): row i keeps
    its first length_i - (padded length - T) positions."""
    if value.dim() < 2:
        return value.tolist()
    offset = max(map(row_length, rows)) - value.shape[1]
    return [v[:max(0, row_length(row) - offset)].tolist() for v, row in zip(value, rows)]


def collate_with_reference(collate, features: list[dict]) -> dict:
    """`collate` of the features, plus their precomputed reference outputs under `__ref` (per-token values
    right-padded with zeros to the longest in the batch)."""
    keys = [k for k in features[0] if k.startswith(PREFIX)]
    refs = {k.removeprefix(PREFIX): _stack([f[k] for f in features]) for k in keys}
    batch = collate([{k: v for k, v in f.items() if k not in keys} for f in features])
    return {**batch, "__ref": refs} if refs else batch


def _stack(values: list) -> torch.Tensor:
    if not values or not isinstance(values[0], list):
        return torch.tensor(values)
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(v) for v in values], batch_first=True)
