"""What alignkit wrote in a folder: `.alignkit-manifest.json`, the run's record of every file and folder it created
there, written atomically before each of them is. Removal, rotation and overwrite touch only its entries; every
other file in the folder is the user's (foreign) and is kept byte for byte; a symbolic link is never followed.

Entries are paths relative to the folder with a kind: `file`, `dir` (alignkit made the folder; what the user put in
it stays, so it is removed only once empty) or `tree` (all of it is alignkit's: a checkpoint-N, a tracker's log
folder). `roots` are the entries (or "." for the folder itself) holding this run's checkpoint-N folders, and `run_id`
names the run owning them: no other run rotates or writes there.

A folder of an alignkit older than the manifest counts as alignkit's only through the names alignkit writes, and
only when a config.yaml that alignkit wrote (a full resolved config) is there.
"""

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import yaml

from alignkit.errors import ConfigError

NAME = ".alignkit-manifest.json"
LOCK = ".alignkit.lock"
CHECKPOINT = re.compile(r"^(\.tmp-|\.old-)?checkpoint-\d+$")
#: what save_pretrained writes for the models and tokenizers alignkit trains (and older alignkit folders hold)
MODEL_FILES = frozenset({
    "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
    "tokenizer.model", "README.md", "processor_config.json", "preprocessor_config.json"})
SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
#: the names a run writes in its output_dir (besides model files, checkpoints and its tracker folder)
RUN_FILES = ("config.yaml", "metrics.jsonl", "plots", "eval_results.json")


def reserved(name: str) -> bool:
    """Whether alignkit writes a file of this name in a run's folder."""
    return name in RUN_FILES or name in MODEL_FILES or bool(SHARD.match(name))


def split_rel(rel: str) -> list[str]:
    """The components of a relative path ("." and empty ones dropped)."""
    return [p for p in Path(rel).parts if p != "."]


class Manifest:
    def __init__(self, home: Path, run_id: str | None = None, entries: dict | None = None, roots=(),
                 owner: str | None = None, saved: bool = False) -> None:
        self.home, self.run_id = Path(home), run_id or uuid.uuid4().hex
        self.entries: dict[str, str] = dict(entries or {})
        self.roots, self.owner, self.saved = list(roots), owner or str(Path(home).absolute()), saved

    # ---- reading ----------------------------------------------------------------------------------

    @classmethod
    def read(cls, home: Path) -> "Manifest | None":
        """The folder's manifest; None if it has none. A damaged one is refused (its folder's owner is unknown)."""
        path = Path(home) / NAME
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link; alignkit writes only regular files (remove the link)")
        try:
            data = json.loads(path.read_text())
            return cls(home, str(data["run_id"]), {str(k): str(v) for k, v in dict(data["entries"]).items()},
                       [str(r) for r in data.get("roots", [])], data.get("owner"), saved=True)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is damaged ({type(e).__name__}); alignkit cannot tell its files from yours "
                              "there: choose another folder, or remove the folder's alignkit files and that manifest"
                              ) from None

    @classmethod
    def load(cls, home: Path) -> "Manifest":
        """The folder's manifest, one adopted from an older alignkit's folder, or a new (unsaved) one."""
        return cls.read(home) or cls.legacy(home) or cls(home)

    @classmethod
    def legacy(cls, home: Path) -> "Manifest | None":
        """An older alignkit's run folder: its known names are alignkit's when alignkit wrote its config.yaml."""
        home = Path(home)
        if not written_config(home / "config.yaml"):
            return None
        m = cls(home)
        for p in sorted(home.iterdir()):
            if p.is_symlink() or not (reserved(p.name) or p.name == "checkpoints"):
                continue
            m.entries[p.name] = "dir" if p.is_dir() else "file"
            if p.name == "plots" and p.is_dir():
                m.entries.update({f"plots/{c.name}": "file" for c in p.iterdir() if c.suffix == ".png" and c.is_file()})
            if p.name == "checkpoints" and p.is_dir():
                m.roots.append("checkpoints")
                m.entries.update({f"checkpoints/{c.name}": "tree" for c in p.iterdir() if CHECKPOINT.match(c.name)})
        return m

    # ---- what is whose ----------------------------------------------------------------------------

    def owns(self, rel: str) -> bool:
        parts = split_rel(rel)
        if not parts:
            return True
        if "/".join(parts) in self.entries:
            return True
        return any(self.entries.get("/".join(parts[:i])) == "tree" for i in range(1, len(parts)))

    def foreign(self, rel: str = ".") -> list[str]:
        """What in the folder (or its own sub-folder rel) alignkit did not write, as paths relative to home."""
        folder, found = self.home / rel, []
        if not folder.is_dir() or folder.is_symlink():
            return []
        for p in sorted(folder.iterdir()):
            sub = "/".join(split_rel(f"{rel}/{p.name}"))
            if rel == "." and p.name in (NAME, LOCK, f".{NAME}.tmp"):
                continue
            if not self.owns(sub):
                found.append(sub)
            elif self.entries.get(sub) == "dir" and p.is_dir() and not p.is_symlink():
                found += self.foreign(sub)
        return found

    def links(self) -> list[str]:
        """Entries that are now symbolic links (alignkit creates none): never written through."""
        return [rel for rel in self.entries if (self.home / rel).is_symlink()]

    # ---- writing ----------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the manifest atomically (a temporary file renamed over it)."""
        data = {"run_id": self.run_id, "owner": self.owner, "roots": self.roots,
                "entries": dict(sorted(self.entries.items()))}
        tmp = self.home / f".{NAME}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.home / NAME)
        self.saved = True

    def add(self, rel: str, kind: str = "file") -> None:
        """Record rel (and the folders above it) before it is created."""
        parts, changed = split_rel(rel), False
        for i in range(1, len(parts)):
            if not self.owns("/".join(parts[:i])):
                self.entries["/".join(parts[:i])], changed = "dir", True
        if not self.owns(rel) or self.entries.get("/".join(parts), kind) != kind:
            self.entries["/".join(parts)], changed = kind, True
        if changed or not self.saved:
            self.save()

    def add_root(self, rel: str) -> None:
        rel = "/".join(split_rel(rel)) or "."
        if rel != ".":
            self.add(rel, "dir")
        if rel not in self.roots:
            self.roots.append(rel)
            self.save()

    def remove(self, rel: str) -> bool:
        """Remove one entry from disk and the manifest; never through a link. False if it stays (a folder that
        still holds foreign files)."""
        parts = split_rel(rel)
        if any((self.home / "/".join(parts[:i])).is_symlink() for i in range(1, len(parts))):
            return True  # under a link: its own entry (the link) is removed instead, nothing behind it
        path, kind = self.home / rel, self.entries.get(rel, "file")
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            if kind == "tree":
                shutil.rmtree(path)
            else:
                try:
                    path.rmdir()
                except OSError:  # it holds foreign files: they and their folder stay
                    return False
        self.entries.pop(rel, None)
        return True

    def clear(self, keep=()) -> list[str]:
        """Remove every entry (innermost first) but those under `keep`; the removed top-level names."""
        removed = []
        for rel in sorted(self.entries, key=lambda r: (-len(split_rel(r)), r)):
            if any(rel == k or rel.startswith(k + "/") for k in keep):
                continue
            existed = (self.home / rel).exists() or (self.home / rel).is_symlink()
            if self.remove(rel) and existed and "/" not in rel:
                removed.append(rel)
        self.roots = [r for r in self.roots if r == "." or r in self.entries]
        self.save()
        return sorted(removed)


def written_config(path: Path) -> bool:
    """Whether path is a config.yaml that alignkit wrote: a full resolved config (a user's holds a few keys)."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        tree = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    core = {"model", "data", "train", "method"}  # and "generation", "rewards" since they exist (older runs lack them)
    return (isinstance(tree, dict) and core <= set(tree) <= core | {"generation", "rewards"}
            and all(isinstance(v, dict) for v in tree.values()) and "name" in tree["method"]
            and {"output_dir", "checkpoint_dir", "seed"} <= set(tree["train"]))


def owner_of(path: Path) -> tuple[Manifest, str] | None:
    """The manifest (and path relative to its folder) of the nearest folder at or above path that has one."""
    path = Path(path).absolute()
    for home in [path, *path.parents]:
        if (home / NAME).is_file() or (home / NAME).is_symlink():
            return Manifest.read(home), os.path.relpath(path, home)
    return None


def checkpoint_holder(path: Path) -> Path | None:
    """The checkpoint folder of a run that path lies in (or is), existing or not: a checkpoint-N in a checkpoint folder
    some manifest records, or (runs of older alignkit) a folder holding an alignkit_state.json."""
    path = Path(path).absolute()
    for below in [path, *path.parents]:
        if (below / "alignkit_state.json").is_file():
            return below
        if not CHECKPOINT.match(below.name):
            continue
        found = owner_of(below.parent)
        if found is not None and ("/".join(split_rel(found[1])) or ".") in found[0].roots:
            return below
    return None
