"""Reliability: killed and interrupted runs resume exactly, checkpoints are atomic, bad input and
non-finite numbers are refused before they do harm."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import alignkit
import alignkit_orpo
from alignkit.engine import checkpoint
from alignkit.testing import plugin_manager
from alignkit_orpo import ORPOLoss, ORPOMethodConfig, odds_ratio_terms
from helpers import ROOT, fast, free_port, read_jsonl
from test_registry import install_fake_dist

SLOW_PLUGIN = """
    import time
    import alignkit

    @alignkit.hookimpl
    def on_step_end(run, step, metrics):
        time.sleep(0.15)
"""
ARGS = ["run", "--method", "orpo", "train.max_steps=14", "train.save_steps=3", "train.logging_steps=2",
        "train.eval_steps=5", "data.max_train_samples=48", "data.max_eval_samples=8", "train.disable_tqdm=true",
        "train.per_device_train_batch_size=4"]


def cli(tmp_path, out, *extra, slow=False, wait=True):
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path),
           "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-slow" if slow else "alignkit"}
    cmd = [sys.executable, "-m", "alignkit", "-q", *ARGS, f"train.output_dir={out}", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout=600)
    return proc


@pytest.fixture
def slow(tmp_path):
    install_fake_dist(tmp_path, "alignkit-slow", "slow", "alignkit_slow_mod", SLOW_PLUGIN)
    return tmp_path


def wait_for(path: Path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before the point to interrupt it"
        assert time.time() - start < timeout
        time.sleep(0.05)


def same_run(a: Path, b: Path) -> None:
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_then_resume_auto_equals_uninterrupted(slow):
    full = cli(slow, slow / "full")
    assert full.returncode == 0, full.stderr
    killed = cli(slow, slow / "run", slow=True, wait=False)
    wait_for(slow / "run" / "checkpoints" / "checkpoint-6", killed)
    time.sleep(0.2)  # somewhere inside step 7 or 8
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (slow / "run" / "model.safetensors").exists()
    resumed = cli(slow, slow / "run", "train.resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr
    same_run(slow / "full", slow / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(slow, sig):
    full = cli(slow, slow / "full")
    assert full.returncode == 0, full.stderr
    interrupted = cli(slow, slow / "run", slow=True, wait=False)
    wait_for(slow / "run" / "checkpoints" / "checkpoint-3", interrupted)
    interrupted.send_signal(sig)
    _, err = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 128 + sig
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"alignkit: stopped: {sig.name} at step ") and "train.resume_from_checkpoint=auto" in line
    step = int(line.split(" at step ")[1].split(":")[0])
    assert (slow / "run" / "checkpoints" / f"checkpoint-{step}" / "alignkit_state.json").is_file()
    resumed = cli(slow, slow / "run", "train.resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr
    same_run(slow / "full", slow / "run")


def fake_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    window = {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "micro_batches": 0}
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "epoch_index": 0, "batches_in_epoch": step,
                                                          "max_steps": 12, "window": window}))
    (path / checkpoint.SCHEDULER_FILE).write_bytes(b"x" * 10)
    if manifest:
        checkpoint.write_manifest(path)
    return path


def test_auto_skips_half_written_checkpoints_and_rotation_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        fake_checkpoint(root, step)
    (root / ".tmp-checkpoint-9").mkdir()  # killed during the save
    fake_checkpoint(root, 12, manifest=False)  # state file written, manifest not yet: not complete
    assert checkpoint.find("auto", root) == root / "checkpoint-6"
    assert [p.name for p in checkpoint.checkpoints(root)] == ["checkpoint-3", "checkpoint-6"]


def test_checkpoint_loads_with_weights_only(pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=2), plugins=pm)
    ckpt = result.output_dir / "checkpoints" / "checkpoint-2"
    from accelerate.utils.other import load  # how accelerate reads them: weights_only=True + numpy RNG types

    assert not list(ckpt.glob("custom_checkpoint_*.pkl"))  # accelerate unpickles those with weights_only=False
    for f in [*ckpt.glob("*.bin"), *ckpt.glob("*.pkl")]:
        load(f, weights_only=True)
    torch.load(ckpt / "scheduler.pt", weights_only=True)


def test_output_dir_of_another_run_is_refused(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(alignkit.ConfigError, match="is not empty and holds another run; continue it with "
                                                    "train.resume_from_checkpoint=auto, write over it with"):
        alignkit.run("orpo", fast(tmp_path, max_steps=3), plugins=pm)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before  # nothing touched
    # the same config again does not start over either: that would delete the earlier run's model and checkpoints
    with pytest.raises(alignkit.ConfigError, match="holds an earlier run of this same config; continue it with "
                                                    "train.resume_from_checkpoint=auto, write over it with"):
        alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before
    over = alignkit.run("orpo", fast(tmp_path, max_steps=3), plugins=pm, **{"train.overwrite_output_dir": True})
    assert not (over.output_dir / "checkpoints").exists()
    assert [r["step"] for r in read_jsonl(over.output_dir / "metrics.jsonl")] == [1, 2, 3, 3]


class NaNAtStep2(ORPOLoss):
    calls = 0

    def __call__(self, model, batch, **kw):
        out = super().__call__(model, batch)
        NaNAtStep2.calls += 1
        if NaNAtStep2.calls == 2:
            out.terms["pairs"] = out.terms["pairs"] * float("nan")
        return out


class NaNPlugin:
    loss = NaNAtStep2

    @alignkit.hookimpl
    def register_methods(self, register):
        register(alignkit.Method(name="nan-orpo",
                                 config=type("C", (ORPOMethodConfig,), {"__annotations__": {"name": str},
                                 "name": "nan-orpo"}), formatter="preference", loss=self.loss, description="test",
                                 demo_data="sort"))


def test_nonfinite_step_stops_the_run_naming_the_step(tmp_path):
    NaNAtStep2.calls = 0
    with pytest.raises(alignkit.AlignkitError, match=r"^step 2: loss nan, gradient norm nan; no weights were changed"):
        alignkit.run("nan-orpo", fast(tmp_path, max_steps=4), plugins=plugin_manager(alignkit_orpo, NaNPlugin()))
    assert not (tmp_path / "out" / "model.safetensors").exists()


class NaNFromStep2(NaNAtStep2):
    def __call__(self, model, batch, **kw):
        out = ORPOLoss.__call__(self, model, batch)
        NaNAtStep2.calls += 1
        if NaNAtStep2.calls >= 2:
            out.terms["pairs"] = out.terms["pairs"] * float("nan")
        return out


def test_nonfinite_step_can_be_skipped(tmp_path):
    NaNAtStep2.calls = 0
    result = alignkit.run("nan-orpo", fast(tmp_path, max_steps=4, skip_nonfinite_steps=True),
                          plugins=plugin_manager(alignkit_orpo, NaNPlugin()))
    weights = load_file(str(result.output_dir / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values()) and result.global_step == 4


def test_skipped_steps_are_warned_once_then_counted(tmp_path, caplog):
    NaNAtStep2.calls = 0
    plugin = NaNPlugin()
    plugin.loss = NaNFromStep2
    caplog.set_level(logging.WARNING)
    alignkit.run("nan-orpo", fast(tmp_path, max_steps=5, skip_nonfinite_steps=True),
                 plugins=plugin_manager(alignkit_orpo, plugin))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("step skipped" in m for m in messages) == 1
    assert "4 of 5 steps were skipped for a non-finite loss or gradient" in messages


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1e4, max_value=0.0), st.floats(min_value=-1e4, max_value=0.0),
       st.sampled_from([torch.float32, torch.bfloat16]), st.floats(min_value=0.01, max_value=10.0))
def test_orpo_loss_and_gradient_are_finite_for_any_mean_logps(lc, lr, dtype, beta):
    chosen = torch.tensor([lc], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([lr], dtype=dtype, requires_grad=True)
    loss, log_odds, _ = odds_ratio_terms(chosen, rejected, beta)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(log_odds).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_prompts_tokenized_differently_by_more_than_one_token(tok):
    from alignkit import DataError
    from alignkit_orpo import PreferenceFormatter

    class SplitsPromptByAnswer:
        """A tokenizer whose prompt ids depend on the answer that follows (never seen in practice)."""

        bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, None

        def encode(self, text):
            ids = [ord(c) for c in text]
            return [7, 7, 7] + ids[3:] if text.endswith("B") else ids

        def __call__(self, text, add_special_tokens=False):  # one text or a batch of them, as tokenizers take
            return {"input_ids": [self.encode(t) for t in text] if isinstance(text, list) else self.encode(text)}

    f = PreferenceFormatter(ORPOMethodConfig(), SplitsPromptByAnswer())
    with pytest.raises(DataError, match="chosen and rejected tokenize the prompt differently by more than one token"):
        f.format({"prompt": "abcd", "chosen": "A", "rejected": "B"})


def test_tokenizer_without_pad_token_uses_eos_with_a_warning(pm, tmp_path, tok, caplog):
    import copy

    from alignkit.testing import tiny_model

    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "m")
    tiny_model().save_pretrained(tmp_path / "m")
    caplog.set_level(logging.WARNING)
    metrics = alignkit.evaluate("orpo", plugins=pm, **{"model.name_or_path": str(tmp_path / "m"),
                                                       "data.max_eval_samples": 4, "train.output_dir": str(tmp_path)})
    assert "eval_loss" in metrics
    assert any("has no pad token; using its eos token" in r.getMessage() for r in caplog.records)


def test_remote_code_is_refused_with_a_message_that_says_so(pm, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {"model_type": "custom-x", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    with pytest.raises(alignkit.ConfigError,
                       match="needs custom code; set model.trust_remote_code=true only if you trust it"):
        alignkit.evaluate("orpo", plugins=pm, **{"model.name_or_path": str(tmp_path / "m"),
                                                 "model.tokenizer_name_or_path": "builtin:tiny"})


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": ["a"], "rejected": "r"}', "row 0: 'chosen' must be a string or a list of"),
    ('{"prompt": "p", "chosen": null, "rejected": "r"}', "row 0: 'chosen' must be a string or a list of"),
    ('{"prompt": "p", "chosen": 7, "rejected": "r"}', "row 0: 'chosen' must be a string or a list of"),
    ('{"prompt": "p", "chosen": "", "rejected": "r"}', "row 0: 'chosen' is an empty string"),
    ('{"prompt": "p", "rejected": "r"}', "row 0: missing column 'chosen'"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": ', "bad.jsonl:2: not valid JSON"),
    ('', "bad.jsonl: the dataset is empty"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n" if line else "")
    env = {"HF_HUB_OFFLINE": "1", "ALIGNKIT_LOAD_PLUGINS": "alignkit", "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", "alignkit", "run", "-m", "orpo",
                           f"data.train={tmp_path / 'bad.jsonl'}",
                           f"train.output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("alignkit:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_config_files(tmp_path, name):
    """The shipped accelerate config files (DDP, FSDP2) on 2 CPU processes give the run of one process."""
    config = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    env = {**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "alignkit", "-q", "run", "--method", "orpo", "train.max_steps=2", "data.max_train_samples=16",
            "train.disable_tqdm=true", "train.logging_steps=1", "train.save_steps=1"]
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
              "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, *args, "train.per_device_train_batch_size=4",
                          f"train.output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "train.per_device_train_batch_size=8",
                          f"train.output_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-1"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    rows_one, rows_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["epoch"] for r in rows_two if "loss" in r] == [0.5, 1.0]  # 16 examples / (2 processes x 4)
    for a, b in zip(rows_one, rows_two):
        key = "loss" if "loss" in a else "eval_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    wa, wb = (load_file(str(tmp_path / "one" / "model.safetensors")),
              load_file(str(tmp_path / "two" / "model.safetensors")))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
