"""PNG charts of a run's metrics.jsonl, generic over the metric names a method logs.

Metrics fall into panels by name: every `*loss` together (loss, nll_loss, ...), `X/chosen` with
`X/rejected`, anything else alone. Train values (solid) and `eval_` values (dashed, dots) of the same
metric share the panel's axes. Written to OUTPUT_DIR/plots: one PNG per panel and overview.png with all
of them; each file is written to a temporary name first, so no half-written PNG is left behind.
"""

import json
import logging
import math
import os
import re
from pathlib import Path

from alignkit.errors import DataError

log = logging.getLogger(__name__)

NOT_METRICS = {"step", "epoch"}
PAIRED = ("/chosen", "/rejected")


def read_metrics(output_dir: Path) -> list[dict]:
    """The rows of output_dir/metrics.jsonl that can be drawn: JSON objects with a numeric `step`. Other lines (torn
    by a crash, not UTF-8, not objects, without a step) are skipped with one counted warning naming the first; a
    one-line DataError when no row is left."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the output_dir of an alignkit run")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    rows, skipped = [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _row(line)
        if row is None:
            skipped.append(lineno)
        else:
            rows.append(row)
    total = len(rows) + len(skipped)
    if not any(set(r) - NOT_METRICS for r in rows):
        if skipped:
            raise DataError(f"{path}: no line is a JSON object with a numeric 'step' and a metric ({total} lines)")
        raise DataError(f"{path}: no metrics logged yet")
    if skipped:
        log.warning("%s: skipped %d of %d lines that are not JSON objects with a numeric 'step' (first: line %d)",
                    path, len(skipped), total, skipped[0])
    return rows


def _number(value) -> bool:
    """A finite number a chart can draw (bools count; a huge int or a nested value does not)."""
    if not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _row(line: bytes) -> dict | None:
    """One metrics line: its `step` and its drawable values; None when it is no JSON object with a numeric step."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(row, dict) or not _number(row.get("step")) or isinstance(row["step"], bool):
        return None
    return {k: v for k, v in row.items() if k == "step" or _number(v)}


def panel_of(name: str) -> str:
    """The panel a metric (without its eval_ prefix) is drawn on."""
    for suffix in PAIRED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return "loss" if name.endswith("loss") else name


def panels(rows: list[dict]) -> dict[str, list[str]]:
    """Panel name -> the metric names (without eval_) drawn on it, in first-seen order."""
    out: dict[str, list[str]] = {}
    for row in rows:
        for key, value in row.items():
            if key in NOT_METRICS or not isinstance(value, (int, float)):
                continue
            name = key.removeprefix("eval_")
            names = out.setdefault(panel_of(name), [])
            if name not in names:
                names.append(name)
    return out


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _draw(ax, rows: list[dict], title: str, names: list[str]) -> None:
    for i, name in enumerate(names):
        color = f"C{i}"
        steps, values = _series(rows, name)
        if steps:
            ax.plot(steps, values, color=color, label=f"train {name}")
        steps, values = _series(rows, f"eval_{name}")
        if steps:
            ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=3, label=f"eval {name}")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _save(fig, path: Path, description: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, metadata={"Description": description})
    os.replace(tmp, path)


def plot_metrics(output_dir: str | Path, dest: str | Path | None = None) -> list[Path]:
    """Write the charts of output_dir/metrics.jsonl; return the paths, overview.png last. Only files alignkit wrote
    are replaced (alignkit.engine.ownership): a file of the user's or a link in the way is refused before any is
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(output_dir))
    groups = panels(rows)
    dest = Path(dest) if dest is not None else Path(output_dir) / "plots"
    from alignkit.engine.ownership import files_in
    from alignkit.engine.rundir import check_writable

    check_writable(dest, key="-o")
    names = {title: re.sub(r"[^A-Za-z0-9_.-]+", "_", title) + ".png" for title in groups}
    record = files_in(dest, [*names.values(), "overview.png"], key="-o")
    written = []
    for title, metric_names in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, rows, title, metric_names)
        fig.tight_layout()
        path = dest / names[title]
        record(path)
        _save(fig, path, f"panels: {title}")
        plt.close(fig)
        written.append(path)
    columns = min(3, len(groups))
    lines = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.5 * lines), squeeze=False)
    for ax, (title, metric_names) in zip(axes.flat, groups.items()):
        _draw(ax, rows, title, metric_names)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    record(dest / "overview.png")
    _save(fig, dest / "overview.png", "panels: " + ", ".join(groups))
    plt.close(fig)
    return written + [dest / "overview.png"]
