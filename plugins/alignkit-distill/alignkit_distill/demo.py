"""The built-in demo: sort a list of digits as prompt-completion rows (`builtin:sort-distill`, `-chat`), and the
built-in teacher, the tiny model trained briefly on that task, built once and cached under
$XDG_CACHE_HOME/alignkit/distill-teacher/<fingerprint> (the source of this module and the core's demo data)."""

import hashlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import datasets
import torch

import alignkit
from alignkit.blocks import demo

log = logging.getLogger(__name__)

TEACHER_STEPS, TEACHER_SEED, TEACHER_LR = 400, 1234, 3e-3


def rows(split: str) -> list[dict[str, str]]:
    return [{"prompt": demo.prompt(d), "completion": " " + demo.words(sorted(d))} for d in demo.split_lists(split)]


def sort_distill(split: str) -> datasets.Dataset:
    """`builtin:sort-distill`: standard prompt-completion rows ("sort: 3 1 2 =" -> " 1 2 3")."""
    return datasets.Dataset.from_list(rows(split))


def sort_distill_chat(split: str) -> datasets.Dataset:
    """`builtin:sort-distill-chat`: the same rows as conversations (a user turn, an assistant turn)."""
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"].removesuffix(" =")}],
         "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in rows(split)])


DATASETS = {"sort-distill": sort_distill, "sort-distill-chat": sort_distill_chat}


def teacher_path() -> Path:
    """Where the built-in teacher is (or will be) cached: a folder named by the fingerprint of what builds it."""
    h = hashlib.sha256(f"{alignkit.__version__}:{TEACHER_STEPS}:{TEACHER_SEED}:{TEACHER_LR}".encode())
    for module in (sys.modules[__name__], demo):
        h.update(inspect.getsource(module).encode())
    return alignkit.cache_dir("distill-teacher", h.hexdigest()[:16])


class DemoDefaults(Mapping):
    """The demo's settings; `model.ref_name_or_path` (the built-in teacher's folder) is read when the demo runs, so
    that it follows $XDG_CACHE_HOME of that moment."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings

    def __getitem__(self, key: str):
        return str(teacher_path()) if key == "model.ref_name_or_path" else self.settings[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self.settings, "model.ref_name_or_path"])

    def __len__(self) -> int:
        return len(self.settings) + 1


def ensure_teacher(model_config) -> Path:
    """The built-in teacher's folder, built first when missing: the tiny model (the student's architecture and
    tokenizer) after TEACHER_STEPS supervised steps on the demo's train split (answer + EOS trained)."""
    path = teacher_path()
    if (path / "config.json").is_file():
        return path
    start = time.time()
    base = model_config.model_copy(update={"name_or_path": "builtin:tiny", "ref_name_or_path": None, "peft": None})
    tokenizer = alignkit.load_tokenizer(base)
    model = alignkit.load_model(base, tokenizer, TEACHER_SEED)
    loss = _train(model, tokenizer)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process built it at the same time: keep theirs
        if not (path / "config.json").is_file():
            raise
    log.info("distill demo: built the teacher in %.1fs (last loss %.3f): %s", time.time() - start, loss, path)
    return path


def _train(model, tokenizer, batch_size: int = 32) -> float:
    g = torch.Generator().manual_seed(TEACHER_SEED)
    encoded = []
    for r in rows("train"):
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p + a, [-100] * len(p) + a))
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR)
    model.train()
    for _ in range(TEACHER_STEPS):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        ids = alignkit.pad_right([encoded[i][0] for i in idx], tokenizer.pad_token_id)
        labels = alignkit.pad_right([encoded[i][1] for i in idx], -100)
        mask = alignkit.pad_right([[1] * len(encoded[i][0]) for i in idx], 0)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()
