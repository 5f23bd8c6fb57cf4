"""One owner per output folder (alignkit.engine.rundir) and resume that checks what it resumes (alignkit.engine.resume,
alignkit.engine.checkpoint): issue 12, items 1-8."""

import hashlib
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import alignkit
from alignkit.engine import checkpoint
from alignkit.engine.manifest import Manifest
from helpers import fast, read_jsonl

HOLD_LOCK = """
import sys, time
from alignkit.engine.rundir import Lock
Lock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".alignkit.lock"}


def test_a_folder_in_use_is_refused_naming_the_process_and_a_dead_owner_is_taken_over(pm, tmp_path, caplog):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    before = snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(alignkit.ConfigError,
                           match=rf"is in use by a running alignkit process, pid {holder.pid} on "):
            alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)  # the same command again
        assert snapshot(out) == before  # the live run's checkpoints and metrics untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    caplog.set_level(logging.WARNING)  # the owner died: its run is continued, taking over its lock
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1, resume_from_checkpoint="auto"), plugins=pm)
    assert any(f"taking over the lock left by pid {holder.pid}" in r.getMessage() for r in caplog.records)


def test_resuming_another_runs_checkpoint_into_a_finished_run_is_refused(pm, tmp_path):
    a = alignkit.run("orpo", fast(tmp_path / "a", max_steps=2), plugins=pm).output_dir
    b = alignkit.run("orpo", fast(tmp_path / "b", max_steps=2, save_steps=1), plugins=pm).output_dir
    before = snapshot(a)
    with pytest.raises(alignkit.ConfigError, match="belongs to another run than train.output_dir"):
        alignkit.run("orpo", fast(tmp_path / "a", max_steps=2, save_steps=1,
                                  resume_from_checkpoint=str(b / "checkpoints" / "checkpoint-1")), plugins=pm)
    assert snapshot(a) == before
    # into an empty folder it is allowed: that folder has no run of its own
    c = alignkit.run("orpo", fast(tmp_path / "c", max_steps=2, save_steps=1,
                                  resume_from_checkpoint=str(b / "checkpoints" / "checkpoint-1")), plugins=pm)
    assert c.global_step == 2


def test_resume_refuses_changed_settings_and_records_the_allowed_ones(pm, tmp_path):
    cfg = fast(tmp_path, max_steps=3, save_steps=2)
    alignkit.run("orpo", cfg, plugins=pm)
    out = tmp_path / "out"
    before = snapshot(out)
    for key, value in [("learning_rate", 1e-3), ("per_device_train_batch_size", 2)]:
        with pytest.raises(alignkit.ConfigError, match=rf"cannot change mid-run: train.{key} \("):
            alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2, resume_from_checkpoint="auto",
                                      **{key: value}), plugins=pm)
    with pytest.raises(alignkit.ConfigError, match=r"cannot change mid-run: data.train \("):
        alignkit.run("orpo", {**fast(tmp_path, max_steps=3, save_steps=2, resume_from_checkpoint="auto"),
                              "data": {"train": "builtin:sort-chat", "max_train_samples": 32, "max_eval_samples": 8}},
                              plugins=pm)
    # a key added to a dict-valued setting is a change too (the schedule's kwargs, here)
    with pytest.raises(alignkit.ConfigError, match=r"cannot change mid-run: train.lr_scheduler_kwargs \(\{\} -> "):
        alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2, resume_from_checkpoint="auto",
                                  lr_scheduler_type="linear", lr_scheduler_kwargs={"last_epoch": -1}), plugins=pm)
    assert snapshot(out) == before
    alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2, resume_from_checkpoint="auto", logging_steps=2),
                 plugins=pm)
    config = (out / "config.yaml").read_text()
    note = "# resumed at step 2 from checkpoint-2 with changed settings: train.logging_steps 1 -> 2"
    assert config.startswith(note + "\n") and "  logging_steps: 2\n" in config and "  learning_rate: " in config
    assert "Resumed at step 2 from checkpoint-2 with changed settings: train.logging_steps 1 -> 2" in (
        out / "README.md").read_text()


def test_a_value_from_the_environment_that_changed_is_refused_on_resume(pm, tmp_path, monkeypatch):
    """config.yaml records `${oc.env:...}`, not the value: the checkpoint keeps a hash of the value, so a resume
    with another value behind the same interpolation is refused."""
    monkeypatch.setenv("TRAIN_DATA", "builtin:sort")
    cfg = fast(tmp_path, max_steps=3, save_steps=2)
    cfg["data"]["train"] = "${oc.env:TRAIN_DATA}"
    alignkit.run("orpo", cfg, plugins=pm)
    out = tmp_path / "out"
    before = snapshot(out)
    monkeypatch.setenv("TRAIN_DATA", "builtin:sort-chat")
    with pytest.raises(alignkit.ConfigError, match=r"other values from the environment for settings that cannot "
                                                   r"change mid-run: data.train \(\$\{oc.env:TRAIN_DATA\}\)"):
        alignkit.run("orpo", cfg, plugins=pm, **{"train.resume_from_checkpoint": "auto"})
    assert snapshot(out) == before
    monkeypatch.setenv("TRAIN_DATA", "builtin:sort")
    assert alignkit.run("orpo", cfg, plugins=pm, **{"train.resume_from_checkpoint": "auto"}).global_step == 3


def test_a_foreign_checkpoint_resumed_into_a_crashed_folder_leaves_no_old_rows(pm, tmp_path):
    """A folder where a run died before its first checkpoint (config.yaml, metrics.jsonl only), resumed from
    another run's checkpoint: the crash's rows do not stay in its metrics.jsonl."""
    alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2), plugins=pm)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "config.yaml").write_text("train: {}\n")
    (crashed / "metrics.jsonl").write_text('{"step": 1, "loss": 999}\n{"step": 2, "loss": 998}\n')
    crashed_manifest(crashed)
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2, output_dir=str(crashed),
                              resume_from_checkpoint=str(checkpoint)), plugins=pm)
    rows = read_jsonl(crashed / "metrics.jsonl")
    assert all(r.get("loss") not in (998, 999) for r in rows) and rows[0]["step"] == 3


def test_overwrite_leaves_only_the_new_runs_files_and_follows_no_link(pm, tmp_path):
    out = tmp_path / "out"
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm, **{"model.peft.r": 4})
    assert (out / "adapter_config.json").is_file()
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("keep me\n")
    (out / "config.yaml").unlink()
    (out / "config.yaml").symlink_to(elsewhere)
    alignkit.run("orpo", fast(tmp_path, max_steps=2), plugins=pm, **{"train.overwrite_output_dir": True})
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not (out / "checkpoints").exists()
    assert elsewhere.read_text() == "keep me\n" and not (out / "config.yaml").is_symlink()
    from transformers import AutoModelForCausalLM

    assert not hasattr(AutoModelForCausalLM.from_pretrained(out), "peft_config")


def test_overwrite_keeps_files_alignkit_did_not_write(pm, tmp_path):
    """Issue 20: a folder with files alignkit did not write is refused; overwrite writes beside them, keeping them."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    with pytest.raises(alignkit.ConfigError, match="holds files alignkit did not write"):
        alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm)
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm, **{"train.overwrite_output_dir": True})
    assert (tmp_path / "out" / "thesis.tex").read_text() == "years of work"


def crashed_manifest(folder: Path) -> None:
    """The manifest a run killed before its first checkpoint leaves beside its config.yaml and metrics.jsonl."""
    Manifest(folder, entries={"config.yaml": "file", "metrics.jsonl": "file"}).save()


def damage(kind: str, ckpt: Path) -> None:
    if kind == "truncated model":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "truncated optimizer":
        data = (ckpt / "optimizer.bin").read_bytes()
        (ckpt / "optimizer.bin").write_bytes(data[:100])
    elif kind == "empty state":
        (ckpt / checkpoint.STATE_FILE).write_text("")
    elif kind == "garbage state":
        (ckpt / checkpoint.STATE_FILE).write_text("{garbage")
    elif kind == "missing scheduler":
        (ckpt / checkpoint.SCHEDULER_FILE).unlink()


def test_auto_falls_back_to_the_newest_intact_checkpoint(pm, tmp_path, caplog):
    base = alignkit.run("orpo", fast(tmp_path / "base", max_steps=3, save_steps=1), plugins=pm).output_dir
    for kind in ["truncated model", "truncated optimizer", "empty state", "garbage state", "missing scheduler"]:
        root = tmp_path / kind.replace(" ", "-")
        shutil.copytree(base.parent, root)
        damage(kind, root / "out" / "checkpoints" / "checkpoint-2")
        assert checkpoint.verify(root / "out" / "checkpoints" / "checkpoint-2") is not None, kind
        caplog.clear()
        caplog.set_level(logging.WARNING)
        result = alignkit.run("orpo", fast(root, max_steps=3, save_steps=1, resume_from_checkpoint="auto"), plugins=pm)
        assert result.global_step == 3
        assert any("skipped damaged checkpoint-2 (" in r.getMessage() and "resuming from checkpoint-1" in r.getMessage()
                   for r in caplog.records), kind
    root = tmp_path / "named"
    shutil.copytree(base.parent, root)
    damage("truncated model", root / "out" / "checkpoints" / "checkpoint-2")
    with pytest.raises(alignkit.ConfigError, match="checkpoint-2 cannot be resumed: model.safetensors has"):
        alignkit.run("orpo", fast(root, max_steps=3, save_steps=1,
                                  resume_from_checkpoint=str(root / "out" / "checkpoints" / "checkpoint-2")),
                                  plugins=pm)


def test_a_pickled_model_in_a_checkpoint_is_refused(pm, tmp_path):
    out = alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm).output_dir
    ckpt = out / "checkpoints" / "checkpoint-1"
    (ckpt / "pytorch_model.bin").write_bytes(b"not even a pickle")
    checkpoint.write_manifest(ckpt)
    with pytest.raises(alignkit.ConfigError,
                       match="pickled weights \\(pytorch_model.bin\\); alignkit loads safetensors only"):
        alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1, resume_from_checkpoint=str(ckpt)), plugins=pm)


def test_a_torn_last_metrics_line_is_dropped_on_resume(pm, tmp_path):
    full = alignkit.run("orpo", fast(tmp_path / "full", max_steps=3, save_steps=2), plugins=pm).output_dir
    out = alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2), plugins=pm).output_dir
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "epo')  # killed while writing a row
    alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2, resume_from_checkpoint="auto"), plugins=pm)
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(full / "metrics.jsonl")


def test_a_crash_before_the_first_checkpoint_does_not_block_the_next_run(pm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("train:\n  learning_rate: 1.0\n")  # what a crashed first attempt left
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    crashed_manifest(out)
    result = alignkit.run("orpo", fast(tmp_path, max_steps=2, resume_from_checkpoint="auto"), plugins=pm)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 2] and result.global_step == 2
    for p in out.iterdir():  # again only what a crash before the first checkpoint leaves
        if p.name not in ("config.yaml", "metrics.jsonl", ".alignkit.lock", ".alignkit-manifest.json"):
            p.unlink()
    Manifest.read(out).add("checkpoints/.tmp-checkpoint-1", "tree")  # killed during the first save (recorded first)
    (out / "checkpoints" / ".tmp-checkpoint-1").mkdir(parents=True)
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 1]


def test_the_lock_is_released_and_a_refused_run_leaves_no_folder(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm)
    assert (tmp_path / "out" / ".alignkit.lock").read_text() == ""  # released: no owner recorded
    with pytest.raises(alignkit.ConfigError, match="no-such-checkpoint cannot be resumed: no such folder"):
        alignkit.run("orpo", fast(tmp_path / "new", max_steps=1,
                                  resume_from_checkpoint=str(tmp_path / "no-such-checkpoint")),
                     plugins=pm)
    assert not (tmp_path / "new").exists()
