"""Pushing a run to the Hugging Face Hub as transformers.Trainer does (train.push_to_hub, train.hub_strategy), for
every method: each save hands a snapshot to one worker thread that uploads it with huggingface_hub's HfApi, so
training never waits for the network. A failed push is reported once and the next save pushes again; the end of
training pushes the run folder and waits for it. The token is passed to HfApi only (config.yaml writes it null).

Strategies (transformers' names): end: the run folder at the end only; every_save: also the model at each
checkpoint (to the repository's root); checkpoint: also the checkpoint as last-checkpoint/ (resumable);
all_checkpoints: also each checkpoint as checkpoint-N/. A save made while a push is still running replaces the
save still waiting to be pushed, so pushes never pile up (train.hub_always_push: every save is pushed, in order).
"""

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.plugin.hookspecs import hookimpl

log = logging.getLogger(__name__)

#: the hidden subfolder of output_dir that holds the snapshots waiting to be pushed (removed once pushed)
STAGING = ".hub-push"


def check(train) -> None:
    """Before any work: a push that cannot happen here is a one-line ConfigError."""
    if not train.push_to_hub:
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        raise ConfigError("train.push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    if constants.is_offline_mode():
        raise ConfigError("train.push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or set "
                          "train.push_to_hub=false")


@dataclass
class _Job:
    folder: Path  # what to upload
    path_in_repo: str | None
    message: str
    step: int
    remove: bool  # a snapshot of ours: removed once pushed (or replaced)
    ignore: tuple[str, ...] = (".*", "**/.*")


class HubPush:
    """The run's pushes (main process); `at_save` is called on every process (the model snapshot is a collective
    save), `on_train_end` (a lifecycle hook: registered for the run) after the final save, `close` at the end of
    train(), however it ends."""

    alignkit_all_runs = True  # observes every run, whatever the method's plugin (alignkit.plugins)

    def __init__(self, train, output_dir: Path, checkpoint_dir: str, is_main: bool) -> None:
        self.train, self.output_dir, self.checkpoint_dir = train, Path(output_dir), checkpoint_dir
        self.is_main = is_main
        self.repo_id = train.hub_model_id or self.output_dir.absolute().name
        self._queue: list[_Job] = []
        self._lock = threading.Condition()
        self._closing = False
        self._created = False
        self.failures = 0  # pushes that failed (the first one is reported)
        self.last_failed = False
        self._thread = None
        if is_main:
            self._thread = threading.Thread(target=self._work, name="alignkit-hub-push", daemon=True)
            self._thread.start()

    # ---- called by the engine -----------------------------------------------------------------------

    def at_save(self, engine, checkpoint: Path, step: int) -> None:
        """After checkpoint-N is written: the model (every strategy but end) and the checkpoint, as the strategy
        says."""
        strategy = self.train.hub_strategy
        if strategy == "end":
            return
        snapshot = self.output_dir / STAGING / f"step-{step}"  # the same path on every process
        engine.save_model(output_dir=snapshot)  # every process: the state dict may be sharded
        if not self.is_main:
            return
        message = f"Training in progress, step {step}"
        jobs = [_Job(snapshot, None, message, step, remove=True)]
        if strategy in ("checkpoint", "all_checkpoints"):
            name = "last-checkpoint" if strategy == "checkpoint" else checkpoint.name
            copy = snapshot.parent / f"{snapshot.name}-{name}"
            _link_tree(checkpoint, copy)  # rotation (train.save_total_limit) may remove the original meanwhile
            jobs.append(_Job(copy, name, message + ", checkpoint", step, remove=True))
        self._put(jobs)

    @hookimpl
    def on_train_end(self, run, metrics) -> None:
        """After the final model and the run's files are written: the run folder (not its checkpoints)."""
        step = run.step
        if self.is_main:
            ignore = (".*", "**/.*", f"{self.checkpoint_dir.strip('/')}/**" if self.checkpoint_dir != "." else "",
                      "checkpoint-*/**", STAGING + "/**")
            self._put([_Job(self.output_dir, None, "End of training", step, remove=False,
                            ignore=tuple(p for p in ignore if p))], final=True)

    def close(self) -> None:
        """Wait for the pushes under way and waiting (the end's included); report a final one that failed."""
        if self._thread is None:
            return
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()
        shutil.rmtree(self.output_dir / STAGING, ignore_errors=True)
        if self.last_failed:
            log.warning("train.push_to_hub: the last push to %s failed; the run is complete in %s: push it with "
                        "`hf upload %s %s`", self.repo_id, self.output_dir, self.repo_id, self.output_dir)

    # ---- the worker ---------------------------------------------------------------------------------

    def _put(self, jobs: list[_Job], final: bool = False) -> None:
        with self._lock:
            if not final and not self.train.hub_always_push:  # a save still waiting is replaced by this newer one
                for old in self._queue:
                    if old.remove:
                        shutil.rmtree(old.folder, ignore_errors=True)
                self._queue.clear()
            self._queue.extend(jobs)
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                job = self._queue.pop(0)
            try:
                self._push(job)
            finally:
                if job.remove:
                    shutil.rmtree(job.folder, ignore_errors=True)

    def _push(self, job: _Job) -> None:
        from huggingface_hub import HfApi

        t = self.train
        try:
            api = HfApi(endpoint=t.hub_endpoint, token=t.hub_token)
            if not self._created:
                self.repo_id = getattr(api.create_repo(self.repo_id, private=t.hub_private_repo, exist_ok=True),
                                       "repo_id", None) or self.repo_id
                self._created = True
            api.upload_folder(repo_id=self.repo_id, folder_path=job.folder, path_in_repo=job.path_in_repo,
                              commit_message=job.message, ignore_patterns=list(job.ignore))
        except Exception as e:  # the network, the hub, the token: training goes on, the next save pushes again
            self.failures += 1
            self.last_failed = True
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            (log.warning if self.failures == 1 else log.debug)(
                "train.push_to_hub: pushing step %d to %s failed (%s); training goes on and the next save pushes "
                "again (later failures are not repeated here)", job.step, self.repo_id, first)
            return
        if self.last_failed:
            log.info("train.push_to_hub: step %d pushed to %s", job.step, self.repo_id)
        self.last_failed = False


def _link_tree(source: Path, dest: Path) -> None:
    """A copy of `source` made of hard links where the file system allows (no data copied)."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)
