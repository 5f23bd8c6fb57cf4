"""Hostile command lines (issue 20): click's own usage errors in alignkit's one-line form with exit code 2, and
`alignkit eval` that says what it evaluates and matches the training run's own eval numbers."""

import json

import pytest
from click.testing import CliRunner

from alignkit.cli.commands import cli
from helpers import read_jsonl

COMMANDS = ["run", "eval", "methods", "config", "format", "plot", "generate", "chat"]


pytestmark = pytest.mark.usefixtures("only_installed_orpo")


def one_line(*args) -> str:
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == "", result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_is_one_line_in_every_command(command):
    line = one_line(command, "--no-such-option")
    assert "--no-such-option" in line and f"alignkit {command} --help" in line


def test_an_unknown_option_or_command_of_the_group_is_one_line():
    assert "--no-such-option" in one_line("--no-such-option", "methods")
    assert "'trian'" in one_line("trian")


@pytest.mark.parametrize("args, named", [
    (["generate", "--model", "m", "--temperature", "hot", "hi"], "'--temperature'"),
    (["generate", "--model", "m", "--temperature", "-1", "hi"], "'--temperature'"),
    (["chat", "--model", "m", "--top-p", "2"], "'--top-p'"),
    (["generate", "--model", "m", "--max-new-tokens", "0", "hi"], "'--max-new-tokens'"),
    (["format", "--method", "orpo", "-n", "many"], "'-n'"),
])
def test_an_invalid_option_value_is_one_line(args, named):
    line = one_line(*args)
    assert "Invalid value" in line and named in line


@pytest.mark.parametrize("args, named", [
    (["generate", "--model", "m"], "PROMPT"),
    (["generate", "hi"], "--model"),
    (["chat"], "--model"),
    (["plot"], "OUTPUT_DIR"),
    (["run", "--method"], "--method"),
])
def test_a_missing_argument_or_option_is_one_line(args, named):
    assert named in one_line(*args)


def test_help_still_prints_help():
    result = CliRunner().invoke(cli, ["generate", "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_eval_without_a_model_says_once_that_it_evaluates_the_untrained_builtin_model(tmp_path):
    args = ["eval", "--method", "orpo", "data.max_eval_samples=4", f"train.output_dir={tmp_path / 'e'}"]
    result = CliRunner().invoke(cli, ["-q", *args])
    assert result.exit_code == 0, result.output
    said = [ln for ln in result.stderr.splitlines() if "untrained" in ln]
    assert len(said) == 1 and "builtin:tiny" in said[0] and "model.name_or_path=" in said[0], result.stderr
    assert "eval_loss" in json.loads(result.stdout)


def test_eval_of_a_trained_folder_prints_the_final_eval_loss_of_training(tmp_path):
    """The default job's settings (its eval batch size among them) follow the model folder: `alignkit eval` with
    only the folder given reproduces training's last evaluation exactly."""
    out = tmp_path / "orpo"
    trained = CliRunner().invoke(cli, ["-q", "run", "--method", "orpo", f"train.output_dir={out}", "train.max_steps=2",
                                       "data.max_train_samples=32", "train.plots=false", "train.save_steps=null"])
    assert trained.exit_code == 0, trained.output
    final = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r][-1]
    result = CliRunner().invoke(cli, ["-q", "eval", "--method", "orpo", f"model.name_or_path={out}"])
    assert result.exit_code == 0, result.output
    assert "untrained" not in result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["eval_loss"] == final["eval_loss"]
    assert {k: evaluated[k] for k in final if k.startswith("eval_")} == {k: v for k, v in final.items()
                                                                         if k.startswith("eval_")}
    # the folder names its method too
    again = CliRunner().invoke(cli, ["-q", "eval", f"model.name_or_path={out}"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["eval_loss"] == final["eval_loss"]
