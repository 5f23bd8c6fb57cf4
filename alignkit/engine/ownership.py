"""What a run may write, replace or remove: only what its manifest (alignkit.engine.manifest) lists.

`RunFolder(out, root)` is a run's claim on its output_dir and its checkpoint folder (train.checkpoint_dir: the
output_dir itself, a folder in it, or a folder elsewhere with a manifest of its own). `check()` refuses, reading
only, what would lose a user's file: an output_dir inside a run's checkpoint folder, a checkpoint folder of another
run, a folder holding files alignkit did not write (unless train.overwrite_output_dir), a file of the user's where
the run writes one of its own, a -c or data file the run would remove or replace, a link where the run writes.
`claim()` then removes the old run's entries (a fresh run) and writes the manifest first; `record()` adds each file
or folder before it is created.
"""

import logging
import os
from pathlib import Path

from alignkit.engine.manifest import CHECKPOINT, NAME, Manifest, checkpoint_holder, owner_of, reserved, split_rel
from alignkit.errors import ConfigError

log = logging.getLogger(__name__)


def _named(paths: list[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _inside(path: Path, folder: Path) -> str | None:
    """path relative to folder (both resolved) if it lies in it, else None."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return os.path.relpath(path, folder) if path == folder or folder in path.parents else None


class RunFolder:
    def __init__(self, out: Path, root: Path, tracker_dir: str | None = None) -> None:
        self.out, self.root, self.tracker_dir = Path(out), Path(root), tracker_dir
        self.manifest = Manifest.load(self.out) if self.out.is_dir() else Manifest(self.out)
        rel = _inside(self.root, self.out)
        self.root_rel = "/".join(split_rel(rel)) or "." if rel is not None else None
        self.root_manifest = None  # a checkpoint folder outside output_dir has a manifest of its own
        if self.root_rel is None:
            found = Manifest.read(self.root) if self.root.is_dir() else None
            self.root_manifest = found or Manifest(self.root, self.manifest.run_id, roots=["."],
                                                   owner=str(self.out.absolute()))

    # ---- checks (nothing written) ------------------------------------------------------------------

    def check(self, clean: bool, overwrite: bool, files: dict[str, str | None]) -> None:
        """Refuse before any write; `clean`: the run starts over (a fresh run), removing the old run's entries;
        `files`: the -c and data files the run reads (key -> path or None)."""
        holder = checkpoint_holder(self.out)
        if holder is not None:
            raise ConfigError(f"train.output_dir: {self.out} lies inside the checkpoint folder {holder} of another "
                              "run, whose saves and rotation replace what is there; choose an output_dir outside it")
        self._check_root()
        self._check_files(clean, files)
        foreign = self.manifest.foreign()
        if clean and foreign and not overwrite:
            raise ConfigError(f"train.output_dir: {self.out} holds files alignkit did not write ({_named(foreign)}); "
                              "train.overwrite_output_dir=true keeps them and removes only what alignkit wrote there, "
                              "or choose another output_dir")
        clashes = [rel for rel in foreign if self._writes(rel)]
        if clashes:
            raise ConfigError(f"train.output_dir: {self.out} holds {_named(clashes)} of yours where alignkit writes "
                              "its own; move them out of the folder or choose another output_dir")
        links = [] if clean else self.manifest.links()  # starting over removes the links themselves
        if links:
            raise ConfigError(f"train.output_dir: {self.out / links[0]} is a symbolic link; alignkit writes nothing "
                              "through a link it did not create: remove the link")

    def _check_root(self) -> None:
        """The checkpoint folder is this run's, or new: no other run's checkpoints are rotated or replaced."""
        if self.root_manifest is None:
            return
        owner = self.root_manifest if self.root_manifest.saved else None
        if owner is None and (found := owner_of(self.root)) is not None and found[0].owns(found[1]):
            owner = found[0]
        if owner is not None and owner.run_id != self.manifest.run_id:
            raise ConfigError(f"train.checkpoint_dir: {self.root} belongs to the run in {owner.owner}; its checkpoints "
                              "are that run's alone: give each run its own checkpoint_dir")
        stray = [rel for rel in self.root_manifest.foreign() if CHECKPOINT.match(rel)]
        if stray:
            raise ConfigError(f"train.checkpoint_dir: {self.root} holds checkpoint folders alignkit did not record "
                              f"({_named(stray)}); choose another checkpoint_dir")

    def _writes(self, rel: str) -> bool:
        """Whether the run writes a file or folder at rel (relative to output_dir)."""
        parts = split_rel(rel)
        top, name = parts[0], parts[-1]
        if len(parts) == 1 and (reserved(top) or top == self.tracker_dir or top == NAME):
            return True
        if self.root_rel is not None:
            if self.root_rel != "." and top == split_rel(self.root_rel)[0] and len(parts) == 1:
                return True
            parent = "/".join(parts[:-1]) or "."
            if parent == self.root_rel and CHECKPOINT.match(name):
                return True
        return top == "plots" and len(parts) == 2 and name.endswith(".png")

    def _check_files(self, clean: bool, files: dict[str, str | None]) -> None:
        for key, value in files.items():
            if not value or not Path(value).exists():
                continue
            rel = _inside(Path(value), self.out)
            if rel is None:
                continue
            rel = "/".join(split_rel(rel))
            if self.manifest.owns(rel) and clean:
                raise ConfigError(f"{key}: {value} is a file this run would remove (alignkit wrote it in "
                                  f"train.output_dir {self.out}); copy it out of the folder first")
            if not self.manifest.owns(rel) and self._writes(rel):
                raise ConfigError(f"{key}: {value} lies in train.output_dir {self.out} where the run writes its own "
                                  f"{rel}; move it out of the folder or choose another output_dir")

    # ---- writing (main process) --------------------------------------------------------------------

    def claim(self, clean: bool) -> list[str]:
        """Write the manifest first; a fresh run removes the old run's entries (only them). The removed names."""
        removed = self.manifest.clear() if clean else []
        self.manifest.save()
        if self.root_rel is not None:
            self.manifest.add_root(self.root_rel)
        else:
            if clean and self.root_manifest.saved:
                removed += [str(self.root / r) for r in self.root_manifest.clear()]
            self.root.mkdir(parents=True, exist_ok=True)
            self.root_manifest.save()
        return removed

    def _home(self, path: Path) -> tuple[Manifest, str]:
        if self.root_manifest is not None and _inside(path, self.root) is not None:
            return self.root_manifest, "/".join(split_rel(os.path.relpath(Path(path).absolute(), self.root.absolute())))
        return self.manifest, "/".join(split_rel(os.path.relpath(Path(path).absolute(), self.out.absolute())))

    def record(self, path: Path, kind: str = "file") -> None:
        """Add path (in output_dir or the checkpoint folder) to its manifest, before it is created."""
        manifest, rel = self._home(path)
        manifest.add(rel, kind)

    def forget(self, path: Path) -> None:
        manifest, rel = self._home(path)
        if manifest.entries.pop(rel, None) is not None:
            manifest.save()

    def owns(self, path: Path) -> bool:
        manifest, rel = self._home(path)
        return manifest.owns(rel)

    def results(self) -> list[str]:
        """What an earlier run here would lose: its entries but config.yaml, metrics.jsonl, plots and the empty
        checkpoint folder (what a run killed before its first checkpoint leaves)."""
        roots = {self.root_rel} if self.root_rel is not None else set()
        found = [rel for rel, kind in self.manifest.entries.items()
                 if split_rel(rel)[0] not in ("config.yaml", "metrics.jsonl", "plots") and rel not in roots
                 and not split_rel(rel)[-1].startswith(".tmp-") and (self.out / rel).exists()]
        if self.root_manifest is not None and self.root_manifest.saved:
            found += [str(self.root / rel) for rel in self.root_manifest.entries if CHECKPOINT.match(rel)
                      and not rel.startswith(".") and (self.root / rel).exists()]
        return found


def files_in(folder: Path, names: list[str], key: str):
    """For a command writing `names` into folder (charts, eval_results.json): refuse a link on the way or a file of
    the user's it would replace, in one line; the function recording each path before it is written."""
    folder = Path(folder)
    for p in [folder, *folder.parents]:
        if p.is_symlink():
            raise ConfigError(f"{key}: {p} is a symbolic link; alignkit writes nothing through a link it did not "
                              "create: remove the link or give another folder")
    found = owner_of(folder)
    if found is not None and (found[0].owns(found[1]) or found[0].home.absolute() == folder.absolute().parent):
        manifest, prefix = found
    elif folder.name == "plots" and (folder.parent / "metrics.jsonl").is_file():  # a run's charts: its folder's
        manifest, prefix = Manifest.legacy(folder.parent) or Manifest(folder.parent), "plots"
    else:
        manifest, prefix = Manifest.load(folder) if folder.is_dir() else Manifest(folder), "."
    rels = {name: "/".join(split_rel(f"{prefix}/{name}")) for name in names}
    theirs = [name for name, rel in rels.items() if (folder / name).exists() and not manifest.owns(rel)]
    if theirs:
        raise ConfigError(f"{key}: {folder} holds {_named(theirs)} that alignkit did not write; it replaces only its "
                          "own files: move them or give another folder")

    def record(path: Path) -> None:
        """Record path and the temporary file it is first written as (`.NAME.tmp`, renamed into place)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in (f".{Path(path).name}.tmp", Path(path).name):
            manifest.add("/".join(split_rel(f"{prefix}/{name}")), "file")

    return record
