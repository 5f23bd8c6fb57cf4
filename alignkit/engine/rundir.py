"""One owner per output folder: train.output_dir is locked for the run, checked before anything is written,
and started over only when that cannot lose another run's results.

- `check_writable(path)` before any work: a file, a folder under a file, or an unwritable place is refused.
- `Lock`: an exclusive `fcntl.flock` on `output_dir/.alignkit.lock`, held for the whole run and recording
  pid, host and command, so a second copy of a running command is refused naming the first. The kernel
  drops the lock when its process dies: a lock left behind by a killed run is stale and taken over.
- What is whose in the folder (the run's manifest, `alignkit.engine.manifest`) and what a run may write or remove there:
  `alignkit.engine.ownership`.
"""

import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

from alignkit.engine import manifest
from alignkit.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = manifest.LOCK


def check_writable(path: Path, key: str = "train.output_dir") -> None:
    """Refuse a folder that cannot be written, before any work: nothing is left behind by the check."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"{key}: {path} lies under a dangling symbolic link {existing}")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under a file ({existing})"
        raise ConfigError(f"{key}: {path} {where}; give a folder")
    try:  # os.access says yes to root even on a read-only mount: try for real, leave nothing
        with tempfile.TemporaryFile(dir=existing, prefix=".alignkit-probe-"):
            pass
    except OSError as e:
        what = "" if existing == path else f" (its nearest existing parent {existing})"
        raise ConfigError(f"{key}: {path}{what} is not writable: {e.strerror or e}") from None


def _holder(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, since {holder.get('started')})"


class Lock:
    """The exclusive lock on an output folder; `release()` when the run ends (the kernel does if it dies)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.fd, self.created = Path(folder), Path(folder) / LOCK_FILE, None, []
        self.made_file = False

    @staticmethod
    def probe(folder: Path, key: str = "train.output_dir") -> None:
        """Refuse at once, writing nothing, if a running process holds the folder's lock."""
        import fcntl

        path = Path(folder) / LOCK_FILE
        if not path.is_file():
            return
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{key}: {folder} is in use by a running alignkit process, "
                                  f"{_describe(_holder(path))}; "
                                  "wait for it to end or choose another output_dir") from None
            fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self, key: str = "train.output_dir") -> None:
        import fcntl

        self.created = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            raise ConfigError(f"{key}: {self.path} is a symbolic link; alignkit writes only regular files there")
        self.made_file = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{key}: {self.folder} is in use by a running alignkit process, "
                              f"{_describe(_holder(self.path))}; wait for it to end or choose another "
                              "output_dir") from None
        previous = _holder(self.path)
        if previous:  # a clean end empties the file: this one's process died holding it
            log.warning("%s: taking over the lock left by %s, which is no longer running", self.folder,
                        _describe(previous))
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self, discard_folder: bool = False) -> None:
        """Unlock. `discard_folder`: the run was refused: the lock file and the folders it created are removed again
        (a folder only while empty)."""
        import fcntl

        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if discard_folder:
            if self.made_file:
                self.path.unlink(missing_ok=True)
            for folder in self.created:  # the folders this run made, innermost first, while empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def write_text(path: Path, text: str) -> None:
    """Replace `path` atomically; a symbolic link there is replaced, never written through."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)
