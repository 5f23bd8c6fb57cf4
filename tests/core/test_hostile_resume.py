"""Resume robustness (issue 20): a damaged alignkit_state.json is a damaged checkpoint (never a crash or phantom
steps), a checkpoint past the run's max_steps is refused before any write, and an evaluation cut short by a stop
request is redone by the resumed run."""

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_reliability_signals import SLOW, logged, wait_until

import alignkit
from alignkit.engine import checkpoint
from helpers import fast, read_jsonl
from test_registry import install_fake_dist

DAMAGE = {
    "a list": [],
    "null": None,
    "no step": "drop step",
    "a string step": {"step": "2"},
    "a float step": {"step": 2.0},
    "a negative step": {"step": -1000},
    "a step beyond max_steps": {"step": 1000},
    "a damaged window": {"window": []},
}


def damage(ckpt, how):
    path = ckpt / checkpoint.STATE_FILE
    state = json.loads(path.read_text())
    if how == "drop step":
        del state["step"]
    elif isinstance(how, dict):
        state.update(how)
    else:
        state = how
    path.write_text(json.dumps(state))
    checkpoint.write_manifest(ckpt)  # consistent hashes: only the content is wrong


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 3-step run with checkpoints 1 and 2; each test copies it."""
    import alignkit_orpo
    from alignkit.testing import plugin_manager

    root = tmp_path_factory.mktemp("base")
    alignkit.run("orpo", fast(root, max_steps=3, save_steps=1), plugins=plugin_manager(alignkit_orpo))
    (root / "out" / "model.safetensors").unlink()  # as if killed after checkpoint-2
    return root


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_state_file_falls_back_to_the_previous_checkpoint(pm, tmp_path, base, kind, caplog):
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    damage(ckpt, DAMAGE[kind])
    problem = checkpoint.verify(ckpt)
    assert problem is not None and checkpoint.STATE_FILE in problem, kind
    caplog.set_level(logging.WARNING)
    result = alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=1, resume_from_checkpoint="auto"), plugins=pm)
    assert result.global_step == 3
    assert any(f"skipped damaged checkpoint-2 ({problem})" in r.getMessage() and "resuming from checkpoint-1" in
               r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("kind", ["a list", "a string step", "a step beyond max_steps"])
def test_a_named_checkpoint_with_a_damaged_state_file_is_refused_in_one_line(pm, tmp_path, base, kind):
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    damage(ckpt, DAMAGE[kind])
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(alignkit.ConfigError, match=f"checkpoint-2 cannot be resumed: its {checkpoint.STATE_FILE}") as e:
        alignkit.run("orpo", fast(tmp_path, max_steps=3, save_steps=1, resume_from_checkpoint=str(ckpt)), plugins=pm)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


@pytest.mark.parametrize("case", ["a shorter run", "a state claiming more steps"])
def test_a_checkpoint_past_the_runs_max_steps_is_refused_before_any_write(pm, tmp_path, base, monkeypatch, case):
    from alignkit.engine.rundata import RunData

    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    max_steps, expected = 1, "other settings that cannot change mid-run: train.max_steps \\(3 -> 1\\)"
    if case == "a state claiming more steps":  # consistent in itself, so verify() cannot tell
        damage(tmp_path / "out" / "checkpoints" / "checkpoint-2", {"step": 1000, "max_steps": 1000})
        max_steps, expected = 3, "checkpoint-2 is at step 1000, past this run's train.max_steps=3"
    monkeypatch.setattr(RunData, "formatted", lambda *a, **k: pytest.fail("the data was tokenized first"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    with pytest.raises(alignkit.ConfigError, match=expected):
        alignkit.run("orpo", fast(tmp_path, max_steps=max_steps, save_steps=1, resume_from_checkpoint="auto"),
                     plugins=pm)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


#: the signal tests' slow-eval plugin, marking each eval batch in the file $EVAL_MARK (to signal during one)
MARKED = SLOW.replace("time.sleep(0.3)", "time.sleep(0.3); open(os.environ['EVAL_MARK'], 'a').write('x')")


@pytest.fixture
def marked(tmp_path):
    install_fake_dist(tmp_path, "alignkit-sloweval", "sloweval", "alignkit_sloweval_mod", MARKED)
    return tmp_path


def start(root: Path, *extra):
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root),
           "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-sloweval", "EVAL_MARK": str(root / "eval-batches")}
    cmd = [sys.executable, "-m", "alignkit", "-q", "run", "--method", "slow-orpo", f"train.output_dir={root / 'out'}",
           "data.train=builtin:sort", "data.eval=builtin:sort", "data.max_train_samples=16", "data.max_eval_samples=12",
           "train.per_device_eval_batch_size=1", "train.per_device_train_batch_size=4", "train.logging_steps=1",
           "train.disable_tqdm=true", "train.plots=false", "train.max_steps=4", "train.save_steps=null", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two launches of the CLI each, about 50 s
@pytest.mark.parametrize("when", ["mid-run", "at start"])
def test_a_sigterm_during_an_evaluation_is_redone_after_resume(marked, when):
    args = ["train.eval_steps=2", f"train.eval_on_start={str(when == 'at start').lower()}"]
    step = 2 if when == "mid-run" else 0
    proc = start(marked, *args)
    if when == "mid-run":
        wait_until(logged(marked / "out", 2), proc)  # the step-2 row is written just before the 3.6 s evaluation
    wait_until((marked / "eval-batches").exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"alignkit: stopped: SIGTERM at step {step}: checkpoint saved in" in err
    resumed = start(marked, *args, "train.resume_from_checkpoint=auto")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    rows = read_jsonl(marked / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_loss" in r] == ([0] if step == 0 else []) + [2, 4]  # none lost
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
