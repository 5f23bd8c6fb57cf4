"""Exact metric reduction: every logged value is a total sum over a total count.

A loss reports each metric either as a 0-d tensor (a micro-batch mean: it is averaged over the
micro-batches, so its count is the number of micro-batches, as TRL does) or as a pair `(sum, count)`
(the engine adds sums and counts over micro-batches, processes, logging windows and eval batches and logs
sum / count, exact whatever the batching). Both become (sum, count) here and are reduced the same way.
"""

import math
from collections.abc import Mapping

import torch

from alignkit.plugin.loss import at_least_fp32


def is_pair(value) -> bool:
    return isinstance(value, (tuple, list))


class MetricSums:
    """(sum, count) per metric name over batches, kept on the device (no synchronisation until `totals`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.batches = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.plain: set[str] = set()  # tensor metrics: their count is the number of batches

    def _tensor(self, value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return at_least_fp32(value.detach()).to(self.device, self.dtype)
        return torch.tensor(float(value), device=self.device, dtype=self.dtype)

    def add(self, metrics: Mapping[str, object]) -> None:
        """One batch's metrics: tensors (batch means) or (sum, count) pairs."""
        self.batches += 1
        for name, value in metrics.items():
            if is_pair(value):
                if len(value) != 2:
                    raise ValueError(f"metric {name!r}: a pair is (sum, count), got {len(value)} values")
                total, count = value
                self.counts[name] = self.counts.get(name, 0) + self._tensor(count)
            else:
                total = value
                self.plain.add(name)
            self.sums[name] = self.sums.get(name, 0) + self._tensor(total)

    def totals(self) -> dict[str, tuple[float, float]]:
        """name -> (sum, count) as floats (one device synchronisation)."""
        names = sorted(self.sums)
        if not names:
            return {}
        counts = [torch.tensor(float(self.batches), device=self.device, dtype=self.dtype) if n in self.plain
                  else self.counts[n] for n in names]
        values = torch.stack([torch.stack([self.sums[n], c]) for n, c in zip(names, counts)]).tolist()
        return {n: (s, c) for n, (s, c) in zip(names, values)}


def add_totals(into: dict[str, list[float]], totals: Mapping[str, tuple[float, float]]) -> None:
    """Add (sum, count) totals into a running {name: [sum, count]} (a logging window)."""
    for name, (s, c) in totals.items():
        entry = into.setdefault(name, [0.0, 0.0])
        entry[0] += s
        entry[1] += c


def means(totals: Mapping[str, tuple[float, float]] | Mapping[str, list[float]]) -> dict[str, float]:
    """sum / count per name (NaN where nothing was counted)."""
    return {name: s / c if c else math.nan for name, (s, c) in totals.items()}


def reduce_totals(totals: Mapping[str, tuple[float, float]] | Mapping[str, list[float]], accelerator
                  ) -> dict[str, tuple[float, float]]:
    """Sums and counts added over all processes (every process calls this; a metric that a process never
    saw counts (0, 0) there)."""
    if accelerator.num_processes == 1:
        return {n: (float(s), float(c)) for n, (s, c) in totals.items()}
    from accelerate.utils import gather_object

    names = sorted(set().union(*gather_object([sorted(totals)])))
    if not names:
        return {}
    device = accelerator.device
    local = torch.tensor([[float(totals[n][0]), float(totals[n][1])] if n in totals else [0.0, 0.0] for n in names],
                         device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    summed = accelerator.reduce(local, "sum").tolist()
    return {n: (s, c) for n, (s, c) in zip(names, summed)}
