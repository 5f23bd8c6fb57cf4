"""Stopping on request: SIGINT and SIGTERM ask training to stop after the current step (or eval batch), with a
checkpoint to resume from; a second one stops at once. Every process agrees on the request before acting on it."""

import contextlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from alignkit.engine import checkpoint
from alignkit.errors import TrainingInterrupted

RESUME = "resume by running the same command with train.resume_from_checkpoint=auto"


class StopSignals:
    """The stop request of one run. `installed()` catches the signals for its length; `stop_if_asked` and
    `stop_at_the_end` turn a request into TrainingInterrupted once a checkpoint (or the model) is saved."""

    def __init__(self, checkpoint_root: Path, step: Callable[[], int]) -> None:
        self.checkpoint_root, self.step, self.signum = checkpoint_root, step, 0

    @property
    def asked(self) -> bool:
        """Whether this process was asked to stop (no collective: safe inside an uneven evaluation)."""
        return bool(self.signum)

    @contextlib.contextmanager
    def installed(self):
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _ask_to_stop(self, signum, frame) -> None:
        if self.signum:  # asked twice: stop at once; checkpoints are renamed into place whole
            found = checkpoint.checkpoints(self.checkpoint_root)
            kept = f"the last complete checkpoint, {found[-1]}, is kept" if found else "no checkpoint was written"
            raise TrainingInterrupted(f"second {signal.Signals(signum).name} during step {self.step() + 1}: stopped "
                                      f"at once; {kept}; resume with train.resume_from_checkpoint=auto", signum)
        self.signum = signum

    def requested(self, accelerator) -> int:
        """The signal that asked to stop (0 if none), agreed on by every process."""
        if accelerator.num_processes == 1:
            return self.signum
        return int(accelerator.reduce(torch.tensor(self.signum, device=accelerator.device), "max"))

    def stop_if_asked(self, accelerator, save_checkpoint: Callable[[], Path]) -> None:
        """Between steps: a request saves a checkpoint and stops."""
        if signum := self.requested(accelerator):
            path = save_checkpoint()
            raise TrainingInterrupted(f"{signal.Signals(signum).name} at step {self.step()}: checkpoint saved in "
                                      f"{path}; {RESUME}", signum)

    def stop_at_the_end(self, accelerator, save_checkpoint: Callable[[], Path], saved_model_in: Path | None) -> None:
        """A stop asked for during the final evaluation or save is never swallowed (non-zero exit)."""
        signum = self.requested(accelerator)
        if not signum:
            return
        name = signal.Signals(signum).name
        if saved_model_in is not None:
            raise TrainingInterrupted(f"{name} while saving the model at step {self.step()}: the model was saved "
                                      f"completely in {saved_model_in}", signum)
        path = save_checkpoint()
        raise TrainingInterrupted(f"{name} at step {self.step()} (the last), before the model was saved: checkpoint "
                                  f"saved in {path}; {RESUME}", signum)
