"""Helpers shared by the tests in every folder (importable as `helpers`: tests/conftest.py is at the rootdir, so
pytest puts tests/ on sys.path)."""

import json
from pathlib import Path

import torch

from alignkit.testing import FixedLogits  # noqa: F401 (the tests' stand-in model, public for plugin authors)

ROOT = Path(__file__).resolve().parent.parent  # the repository
BENCHMARKS = ROOT / "benchmarks"


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


def chat(role, content) -> dict:
    return {"role": role, "content": content}


def refused(*args, written=None) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr (returned) and `written` must not exist."""
    from click.testing import CliRunner

    from alignkit.cli.commands import cli

    result = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: "), result.stderr
    assert written is None or not written.exists(), sorted(p.name for p in written.rglob("*"))
    return lines[0]


def kill_at_checkpoint_then_resume(tmp_path, cli, args, after_kill=None) -> dict:
    """A run of `cli(out, *args, wait=...)` (a subprocess runner returning its Popen) in tmp_path/full, and the same
    run in tmp_path/run SIGKILLed once checkpoint-2 is written, then resumed with resume_from_checkpoint=auto: the
    final weights are bit-identical and the last metrics rows equal. `after_kill(checkpoint)` may inspect the
    checkpoint the kill left. Returns the last metrics row."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    cli(tmp_path / "full", *args)
    killed = cli(tmp_path / "run", *args, wait=False)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    while not (ckpt / "alignkit_state.json").exists():
        assert killed.poll() is None, killed.stderr.read()[-3000:]
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    if after_kill is not None:
        after_kill(ckpt)
    cli(tmp_path / "run", *args, "train.resume_from_checkpoint=auto")
    a, b = (load_file(str(tmp_path / "full" / "model.safetensors")),
            load_file(str(tmp_path / "run" / "model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, run = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert full[-1] == run[-1]
    return full[-1]


def record_forwards(model) -> list:
    """A list that fills with (batch rows, pixel_values or None) at each forward of `model` (a forward pre-hook)."""
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["input_ids"].shape[0], kwargs.get("pixel_values"))),
        with_kwargs=True)
    return seen
