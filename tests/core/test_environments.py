"""Environments as plugins: the hook and its registry, `alignkit environments`, selection by method.environment with
its own options, and every wrong name or option as one line, exit 2, before anything is written."""

import sys

import guess_environment
import pytest
from click.testing import CliRunner

from alignkit.cli.commands import cli
from alignkit.errors import ConfigError, PluginError
from alignkit.online.environments import EnvironmentRegistry, resolve_all
from alignkit.testing import plugin_manager
from helpers import ROOT, read_jsonl, refused

SMALL = ["method.num_generations=2", "method.max_completion_length=24", "method.sft_warmup_steps=0",
         "method.max_turns=2", "train.max_steps=2", "train.per_device_train_batch_size=2", "train.save_steps=null",
         "train.plots=false", "train.disable_tqdm=true", "train.logging_steps=1", "data.max_train_samples=8",
         "data.max_eval_samples=2", "train.per_device_eval_batch_size=2", "train.eval_steps=null"]


@pytest.fixture
def installed_guess(tmp_path, monkeypatch):
    """The guess plugin as `pip install` leaves it: a dist-info with its `alignkit` entry point on sys.path."""
    info = tmp_path / "site" / "alignkit_guess-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alignkit-guess\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[alignkit]\nguess = guess_environment\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "core"))
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit,alignkit-grpo,alignkit-guess")
    yield


def test_the_core_registers_calculator_and_plugins_register_through_the_hook():
    registry = EnvironmentRegistry.from_plugins(plugin_manager(guess_environment))
    assert set(registry.factories) == {"calculator", "guess", "bad-tool"}
    assert registry.factories["guess"][1] == "guess_environment"
    spec = registry.select("guess", {"secret": 7})
    assert spec.options.secret == 7 and spec.reward_names == ["hit"]


def test_registering_a_name_twice_names_both_sources():
    class Again:
        import alignkit

        @alignkit.hookimpl
        def register_environments(self, register):
            register("calculator", object)

    with pytest.raises(PluginError, match="environment 'calculator' is registered twice: by alignkit and by"):
        EnvironmentRegistry.from_plugins(plugin_manager(Again()))


def test_async_reset_and_step_are_awaited_together():
    env = guess_environment.GuessEnvironment(guess_environment.GuessOptions(secret=3))
    first, = resolve_all([env.reset({"prompt": "p"})])
    assert first == [{"role": "user", "content": "guess a digit (p)"}]
    a, b = resolve_all([env.step({"role": "assistant", "content": "1"}), env.step({"role": "assistant",
                                                                                  "content": "3"})])
    assert a == ([{"role": "user", "content": "higher"}], {"hit": 0.0}, False) and b == (None, {"hit": 1.0}, True)


def test_environments_command_lists_the_builtin_and_installed_ones(installed_guess):
    result = CliRunner().invoke(cli, ["-q", "environments"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(ln.startswith("calculator") and "alignkit" in ln and "tools: calculate" in ln for ln in lines), lines
    assert any(ln.startswith("guess") and "alignkit-guess" in ln and "higher" in ln for ln in lines), lines


@pytest.mark.parametrize(("setting", "said"), [
    (["method.environment=calculater"], "method.environment: no environment 'calculater' (did you mean "
                                        "'calculator'?); registered: bad-tool, calculator, guess"),
    (["method.environment=calculator", "method.environment_options={tools: [abacus]}"],
     "method.environment_options.tools: no tool 'abacus'; this environment has: calculate"),
    (["method.environment=calculator", "method.environment_options={timeout: -1}"],
     "method.environment_options.timeout: Input should be greater than 0"),
    (["method.environment=guess", "method.environment_options={secrets: 3}"],
     "method.environment_options.secrets: Extra inputs are not permitted"),
    (["method.environment=bad-tool"], "environment 'bad-tool': tool 'untyped' cannot become a tool schema"),
])
def test_a_wrong_environment_tool_or_option_is_one_line_before_anything_is_written(tmp_path, installed_guess,
                                                                                    setting, said):
    out = tmp_path / "out"
    line = refused("run", "-m", "grpo", f"train.output_dir={out}", *SMALL, *setting, written=out)
    assert said in line, line


def test_guess_options_forbid_unknown_keys():
    with pytest.raises(ConfigError):
        EnvironmentRegistry.from_plugins(plugin_manager(guess_environment)).select("guess", {"secret": "x"})


def test_the_installed_third_party_environment_runs(tmp_path, installed_guess):
    guess_environment.GuessEnvironment.resets.clear()
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "run", "-m", "grpo", f"train.output_dir={out}", *SMALL,
                                      "method.environment=guess", "method.environment_options={secret: 4}"])
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert "rewards/env/hit/mean" in rows[0] and "episodes/turns/mean" in rows[0], rows[0]
    assert 1 <= rows[0]["episodes/turns/mean"] <= 2
    resets = guess_environment.GuessEnvironment.resets  # one fresh environment per episode, a group per row
    assert len(resets) >= 2 * 2 * 2 and all(a == b for a, b in zip(resets[::2], resets[1::2]))
    sys.modules.pop("alignkit_guess", None)


def test_the_hooks_md_example_registers_a_tool_environment():
    from test_docs_hooks import example

    spec = EnvironmentRegistry.from_plugins(plugin_manager(example("register_environments"))).select("reverser", {})
    env = spec.build()
    observation, _, done = env.step({"role": "assistant", "content": '<tool_call>{"name": "reverse", "arguments": '
                                                                     '{"text": "abc"}}</tool_call>'})
    assert observation == [{"role": "tool", "name": "reverse", "content": "cba"}] and not done
