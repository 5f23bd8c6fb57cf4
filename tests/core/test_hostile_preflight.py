"""Refusals that write first (issue 20): every check that can be made is made before the first write, and a
refusal leaves nothing behind (neither in the output folder nor in the working directory). Also a method's own
`validate(config)` hook (issue 21, gap 6)."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import alignkit
import alignkit_orpo
from alignkit.cli.commands import cli
from alignkit.engine.rundata import RunData
from alignkit.testing import plugin_manager
from helpers import ROOT, fast


@pytest.fixture(autouse=True)
def only_installed_orpo(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit")
    monkeypatch.chdir(tmp_path)  # anything written into the working directory shows in the tree


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def refused(tmp_path, *args) -> str:
    """Run the CLI in tmp_path (the working directory); assert one line, exit 2 and no change to tmp_path."""
    before = tree(tmp_path)
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: "), result.stderr[-3000:]
    assert tree(tmp_path) == before, "the refusal wrote or changed files"
    return lines[0]


def quick(out: Path) -> list[str]:
    return [f"train.output_dir={out}", "train.max_steps=1", "data.max_train_samples=8", "data.max_eval_samples=4",
            "train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=4", "train.disable_tqdm=true",
            "train.eval_on_start=false", "train.save_steps=null", "train.plots=false"]


@pytest.mark.parametrize("targets", ["[no_such_module]", "[q_proj,no_such_module]"])
def test_a_lora_target_typo_names_the_module_and_valid_ones_before_any_write(tmp_path, targets):
    line = refused(tmp_path, "run", "--method", "orpo", *quick(tmp_path / "out"),
                   f"model.peft.target_modules={targets}")
    assert "model.peft.target_modules" in line and "no_such_module" in line
    assert "q_proj" in line and "v_proj" in line  # a few of the names that exist
    assert not (tmp_path / "out").exists()


def test_a_finished_run_folder_is_refused_before_the_data_is_tokenized(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["-q", "run", "--method", "orpo", *quick(out)]).exit_code == 0
    tokenized = []
    original = RunData.formatted
    monkeypatch.setattr(RunData, "formatted", lambda self, *a, **k: tokenized.append(1) or original(self, *a, **k))
    line = refused(tmp_path, "run", "--method", "orpo", *quick(out))
    assert "train.output_dir" in line and "not empty" in line
    assert tokenized == [], "the data was tokenized before the folder was refused"


def test_a_resume_with_changed_settings_is_refused_before_the_data_is_tokenized(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [*quick(out), "train.max_steps=2", "train.save_steps=1"]
    assert CliRunner().invoke(cli, ["-q", "run", "--method", "orpo", *args]).exit_code == 0
    os.remove(out / "model.safetensors")  # as if killed after the checkpoint
    tokenized = []
    original = RunData.formatted
    monkeypatch.setattr(RunData, "formatted", lambda self, *a, **k: tokenized.append(1) or original(self, *a, **k))
    line = refused(tmp_path, "run", "--method", "orpo", *args, "train.resume_from_checkpoint=auto",
                   "train.learning_rate=0.1")
    assert "cannot change mid-run: train.learning_rate" in line
    assert tokenized == []


@pytest.mark.parametrize("setting", ["train.eval_steps=1", "train.eval_on_start=true"])
def test_evaluation_asked_for_without_eval_data_is_refused(tmp_path, setting):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 4)
    line = refused(tmp_path, "run", "--method", "orpo", *quick(tmp_path / "out"), f"data.train={data}", setting)
    key = setting.split("=")[0]
    assert key in line and "data.eval" in line and "data.eval_fraction" in line


def test_evaluation_with_held_out_data_is_accepted(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 8)
    result = alignkit.run("orpo", fast(tmp_path, max_steps=1, eval_steps=1),
                          **{"data.train": str(data), "data.eval_fraction": 0.5})
    assert "eval_loss" in result.metrics


# ---- a method's validate(config) hook (issue 21, gap 6) -------------------------------------------------------

def no_lora(config):
    if config.model.peft is not None:
        raise alignkit.ConfigError("model.peft: method strict-orpo cannot train LoRA adapters; remove model.peft")


class StrictPlugin:
    @alignkit.hookimpl
    def register_methods(self, register):
        register(alignkit.Method(name="strict-orpo", config=StrictConfig, formatter="preference",
                                 loss=alignkit_orpo.ORPOLoss, description="ORPO without LoRA", demo_data="sort",
                                 validate=no_lora))


class StrictConfig(alignkit_orpo.ORPOMethodConfig):
    name: str = "strict-orpo"


def test_a_methods_validate_hook_refuses_before_anything_is_loaded_or_written(tmp_path, monkeypatch):
    import alignkit.engine.loop

    loaded = []
    monkeypatch.setattr(alignkit.engine.loop, "load_tokenizer", lambda *a: loaded.append(1))
    pm = plugin_manager(alignkit_orpo, StrictPlugin())
    before = tree(tmp_path)
    with pytest.raises(alignkit.ConfigError, match="^model.peft: method strict-orpo cannot train LoRA adapters"):
        alignkit.run("strict-orpo", fast(tmp_path), plugins=pm, **{"model.peft.r": 4})
    assert loaded == [] and tree(tmp_path) == before


def test_a_validate_hook_that_accepts_lets_the_run_train(tmp_path):
    pm = plugin_manager(alignkit_orpo, StrictPlugin())
    assert alignkit.run("strict-orpo", fast(tmp_path, max_steps=1), plugins=pm).global_step == 1


def test_validate_must_be_callable():
    with pytest.raises(TypeError, match="validate must be a callable"):
        alignkit.Method(name="x", config=StrictConfig, formatter="preference", loss="orpo", description="x",
                        validate="no")


def test_the_guides_validate_example_refuses_lora_before_any_write(tmp_path):
    import re
    import types

    guide = (ROOT / "docs" / "writing-a-method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    plugin_code, validate_code = blocks[0], next(b for b in blocks if "validate=" in b)
    module = types.ModuleType("alignkit_nll_full")
    exec(compile(plugin_code + "\n" + validate_code, "writing-a-method.md", "exec"), module.__dict__)
    pm = plugin_manager(alignkit_orpo, module)
    before = tree(tmp_path)
    with pytest.raises(alignkit.ConfigError, match="^model.peft: method nll-full trains every weight"):
        alignkit.run("nll-full", fast(tmp_path), plugins=pm, **{"model.peft.r": 4, "data.train": "builtin:sort-sft"})
    assert tree(tmp_path) == before


# ---- each kind of mistake, through the CLI: one line, exit 2, nothing written ---------------------------------

def test_data_without_the_methods_columns_is_refused_before_any_write(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen_text": "b", "rejected": "c"}\n' * 4)
    line = refused(tmp_path, "run", "--method", "orpo", *quick(tmp_path / "out"), f"data.train={data}",
                   "data.eval_fraction=0.5")
    assert "chosen" in line


def test_a_damaged_model_folder_is_refused_before_any_write(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    line = refused(tmp_path, "run", "--method", "orpo", *quick(tmp_path / "out"), f"model.name_or_path={model}",
                   "model.tokenizer_name_or_path=builtin:tiny")
    assert "model.name_or_path" in line


def test_a_damaged_named_checkpoint_is_refused_before_any_write(tmp_path):
    line = refused(tmp_path, "run", "--method", "orpo", *quick(tmp_path / "out"),
                   f"train.resume_from_checkpoint={tmp_path / 'nowhere'}")
    assert "cannot be resumed: no such folder" in line
    assert not (tmp_path / "out").exists()


def test_resuming_into_a_folder_in_use_writes_nothing(tmp_path):
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["-q", "run", "--method", "orpo", *quick(out), "train.max_steps=2",
                                    "train.save_steps=1"]).exit_code == 0
    line = refused(tmp_path, "run", "--method", "orpo", *quick(out), "train.max_steps=2", "train.save_steps=1",
                   "train.resume_from_checkpoint=auto", "train.seed=7")
    assert "train.seed" in line
