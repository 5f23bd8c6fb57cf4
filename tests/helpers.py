"""Helpers shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

import json

import torch

from alignkit.testing import FixedLogits  # noqa: F401 (the tests' stand-in model, public for plugin authors)


def fast(tmp_path, **train) -> dict:
    """A config for a few quick steps of the built-in demo in tmp_path."""
    return {
        "data": {"max_train_samples": 32, "max_eval_samples": 8},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
                  "per_device_eval_batch_size": 4, "logging_steps": 1, "save_steps": None, "eval_steps": None,
                  "eval_on_start": False, "disable_tqdm": True, "plots": False, **train},
    }


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def free_port() -> int:
    """A free TCP port on localhost for a launcher's rendezvous (parallel or back-to-back launches)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_pairs() -> dict:
    """Rows chosen0, chosen1, rejected0, rejected1; a 2-token prompt; rows 1 and 3 padded (pad id 0)."""
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 5, 8, 2, 0], [1, 5, 9, 9, 2], [1, 5, 3, 2, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
