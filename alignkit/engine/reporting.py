"""Per-run observers of the lifecycle hooks: metrics.jsonl, the progress bar and accelerate trackers.

They are ordinary hook implementations, registered for the duration of one run, so a plugin sees
exactly what they see.
"""

import json
import logging
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.plugin.hookspecs import hookimpl


def check_trackers(names: list[str]) -> None:
    """accelerate silently drops a tracker that is not installed: refuse instead."""
    from accelerate.tracking import get_available_trackers

    from alignkit.errors import ConfigError

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ConfigError(f"train.report_to: {name} is not installed here; pip install {name}, or remove it")


def observers(run, accelerator) -> list:
    """The engine's own observers of one run: metrics.jsonl, the progress bar, trackers, plots."""
    t = run.config.train
    found = [MetricsFile(run.output_dir / "metrics.jsonl"), ProgressBar(t.disable_tqdm, run.method.progress_metrics)]
    found += [Trackers(accelerator)] if t.report_to else []
    found += [Plots(run.output_dir)] if t.plots else []
    return found


class MetricsFile:
    """Appends one JSON object per log and per eval to output_dir/metrics.jsonl (main process)."""

    alignkit_all_runs = True

    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def on_train_start(self, run):
        """A fresh run starts an empty file; a resumed one drops the rows it will write again, so the file
        matches an uninterrupted run."""
        if not run.is_main_process:
            return
        rows = self.path.read_text().splitlines() if self.path.exists() and run.resumed_from is not None else []
        kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= run.step]
        self.path.write_text("".join(r + "\n" for r in kept))

    def _append(self, run, row: dict) -> None:
        if run.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(_recorded_names(row, run.config)) + "\n")

    @hookimpl
    def on_log(self, run, step, logs):
        self._append(run, {"step": step, "epoch": round(run.epoch, 4), **logs})

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        self._append(run, {"step": step, "epoch": round(run.epoch, 4), **metrics})


def _recorded_names(metrics: dict, config) -> dict:
    """Metric names as they may be written: a name built from a setting given through `${oc.env:...}` (e.g. a reward
    model's path) holds the interpolation, not the value."""
    from alignkit.config import redact

    return {redact(k, config): v for k, v in metrics.items()}


class ProgressBar:
    """Step, loss, the method's progress_metrics and ETA on the main process."""

    alignkit_all_runs = True

    def __init__(self, disable: bool, shown: tuple[str, ...] = ()) -> None:
        self.disable, self.bar, self.shown = disable, None, ("loss", *shown)

    @hookimpl
    def on_train_start(self, run):
        quiet = not logging.getLogger("alignkit").isEnabledFor(logging.INFO)  # `alignkit -q`
        self.bar = tqdm(total=run.max_steps, initial=run.step, desc="training", dynamic_ncols=True,
                        disable=self.disable or quiet or not run.is_main_process)
        self.visible = not self.bar.disable

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.bar.update(1)
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.shown if k in metrics}, refresh=False)
        if step >= run.max_steps:  # ended once, here: the final eval, save and charts print below it, not around it
            self.bar.close()

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        if self.visible:  # after close, bar.write prints the line alone
            named = _recorded_names(metrics, run.config)  # logs are kept too: no ${oc.env:...} value in them
            shown = ", ".join(f"{k}={v:.4g}" for k, v in named.items() if not math.isnan(v))
            self.bar.write(f"step {step}: {shown}", file=sys.stderr)

    @hookimpl
    def on_train_end(self, run, metrics):
        self.bar.close()


class Trackers:
    """Forwards logs and eval metrics to the trackers in train.report_to through accelerate."""

    alignkit_all_runs = True

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @hookimpl
    def on_train_start(self, run):
        from alignkit.config import recorded

        config = recorded(run.config)  # ${oc.env:...} values stay out of the config the trackers keep
        flat = {f"{section}.{k}": v for section, block in config.model_dump(mode="json").items()
                for k, v in block.items() if isinstance(v, (int, float, str, bool))}
        t = run.config.train  # the name resolved: job-${oc.env:SLURM_JOB_ID} names each job apart
        self.accelerator.init_trackers(t.run_name or Path(t.output_dir).name, config=flat)

    @hookimpl
    def on_log(self, run, step, logs):
        self.accelerator.log({f"train/{k}": v for k, v in _recorded_names(logs, run.config).items()}, step=step)

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        named = _recorded_names(metrics, run.config)
        self.accelerator.log({k.replace("eval_", "eval/", 1): v for k, v in named.items()}, step=step)

    @hookimpl
    def on_train_end(self, run, metrics):
        self.accelerator.end_training()


class Plots:
    """PNG charts of metrics.jsonl in output_dir/plots at the end of training (main process)."""

    alignkit_all_runs = True

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir

    @hookimpl
    def on_train_end(self, run, metrics):
        if not run.is_main_process or not (self.output_dir / "metrics.jsonl").exists():
            return
        try:
            from alignkit.engine.plots import plot_metrics

            paths = plot_metrics(self.output_dir)
        except ImportError:
            logging.getLogger(__name__).warning("no plots: matplotlib is not installed (pip install matplotlib)")
        except Exception as e:  # a chart must never fail a finished run
            logging.getLogger(__name__).warning("no plots: %s: %s", type(e).__name__, e)
        else:
            logging.getLogger(__name__).info("charts: %s", paths[-1])
