"""The engine's shape (issue 21): a constructor that only stores, load()/setup() apart from train(), a loop and
step that read in <= 80 lines, signal handling in its own module, resume results returned, no test reaching into
the engine's private attributes."""

import inspect
import re
from pathlib import Path

import pytest

import alignkit
import alignkit.engine.loop
from alignkit import load_config
from alignkit.engine.loop import Engine
from helpers import fast

TESTS = Path(__file__).parent


def test_the_constructor_loads_checks_and_writes_nothing(pm, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(alignkit.engine.loop, "load_tokenizer", lambda *a: loaded.append("tokenizer"))
    monkeypatch.setattr(alignkit.engine.loop, "load_model", lambda *a: loaded.append("model"))
    (tmp_path / "out").write_text("a file where the output folder should be")  # refused, but only by load()
    cfg, method = load_config("orpo", fast(tmp_path), plugins=pm)
    engine = Engine(cfg, method, pm)
    assert loaded == [] and engine.model is None and engine.tokenizer is None and engine.prepared is None
    with pytest.raises(alignkit.ConfigError, match="train.output_dir"):
        engine.train()
    assert loaded == [] and (tmp_path / "out").read_text().startswith("a file")


def test_load_writes_nothing_and_setup_then_train_is_train(pm, tmp_path):
    plain = alignkit.run("orpo", fast(tmp_path / "a", max_steps=3, learning_rate=3e-3), plugins=pm).metrics
    cfg, method = load_config("orpo", fast(tmp_path / "b", max_steps=3, learning_rate=3e-3), plugins=pm)
    engine = Engine(cfg, method, pm).load()
    assert engine.model is not None and engine.loss is not None and not (tmp_path / "b" / "out").exists()
    prepared = engine.setup()
    assert engine.state.max_steps == 3 and prepared.window.steps == 0 and engine.setup() is prepared
    assert (tmp_path / "b" / "out" / "config.yaml").is_file() and engine.state.step == 0
    assert engine.train() == plain


def test_a_resume_is_returned_to_the_engine_not_written_into_it(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm)
    first = next((tmp_path / "out").rglob("checkpoint-1"))
    cfg, method = load_config("orpo", fast(tmp_path, max_steps=2, save_steps=1, logging_steps=2,
                                           resume_from_checkpoint=str(first)), plugins=pm)
    engine = Engine(cfg, method, pm)
    engine.train()
    assert engine.state.resumed_from.name == "checkpoint-1" and engine.state.step == 2
    assert len(engine.notes) == 1 and engine.notes[0].startswith("# resumed at step 1 from checkpoint-1 with changed")
    assert "train.logging_steps 1 -> 2" in engine.notes[0]
    assert "Resumed at step 1 from checkpoint-1" in (tmp_path / "out" / "README.md").read_text()  # the model card
    assert not [name for name in vars(engine) if name in ("_lock", "_record_notes", "_scheduler", "_stop_signal")]


def test_the_loop_and_one_step_read_in_80_lines():
    parts = [Engine.train, Engine._loop, Engine._do, Engine._optimizer_step, Engine.accumulate_gradients]
    lines = sum(len(inspect.getsource(fn).splitlines()) for fn in parts)
    assert lines <= 80, lines
    source = inspect.getsource(alignkit.engine.loop)
    assert "import signal" not in source and "threading" not in source  # alignkit.engine.signals


def test_no_test_calls_a_private_engine_attribute():
    private = re.compile(r"\bengine\._[a-z]|\.(_datasets|_loader|_loss|_lockstep|_accumulate_gradients|_context)\(")
    found = [f"{path.name}:{i}" for path in sorted(TESTS.rglob("*.py")) if path.name != Path(__file__).name
             for i, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert found == []
