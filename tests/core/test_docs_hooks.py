"""Every hook in docs/hooks.md has a worked example, and every example runs: the registration examples register
what they say (and their methods train), the lifecycle examples are called in one short run and do what they say."""

import inspect
import math
import re
import types

import pytest

import alignkit
import alignkit_orpo
from alignkit.formatters import PromptCompletionFormatter
from alignkit.plugin import hookspecs
from alignkit.plugins import PluginManager, build_registry, registered_datasets
from alignkit.testing import plugin_manager
from helpers import ROOT, fast, read_jsonl

DOC = (ROOT / "docs" / "hooks.md").read_text()
SPECS = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "alignkit_spec")]


def section(hook: str) -> str:
    return re.search(rf"^## {hook}\(.*?(?=^## |\Z)", DOC, re.S | re.M).group(0)


def example(hook: str) -> types.ModuleType:
    """The section's (first) python block, run as a module of its own."""
    source = re.findall(r"```python\n(.*?)```", section(hook), re.S)[0]
    module = types.ModuleType(f"hooks_md_{hook}")
    exec(compile(source, f"docs/hooks.md ({hook})", "exec"), module.__dict__)
    return module


def test_every_hook_has_a_worked_example_that_implements_it():
    assert len(SPECS) == 12
    for hook in SPECS:
        blocks = re.findall(r"```python\n(.*?)```", section(hook), re.S)
        assert blocks, f"docs/hooks.md: '{hook}' has no example"
        assert re.search(rf"^    def {hook}\(self, |^def {hook}\(", blocks[0], re.M), f"the {hook} example lacks it"


@pytest.mark.parametrize(("hook", "method", "metric"), [("register_methods", "hinge", "eval_rewards/accuracies"),
                                                        ("register_losses", "margin", "eval_rewards/margins")])
def test_the_method_and_loss_examples_train(tmp_path, hook, method, metric):
    pm = plugin_manager(alignkit_orpo, example(hook))  # the preference formatter and the sort demo, by name
    result = alignkit.run(method, fast(tmp_path), plugins=pm)
    assert result.global_step == 4 and metric in result.metrics and math.isfinite(result.metrics["eval_loss"])


def test_the_formatter_example_is_registered_and_upper_cases_the_completion(tok):
    registry = build_registry(plugin_manager(example("register_formatters")))
    cls = registry.part("formatters", "shouted-completions", "test")
    row = {"prompt": "sort: 3 1 =", "completion": " abc"}
    plain = PromptCompletionFormatter(PromptCompletionFormatter.config_class(name="t"), tok)
    shouted = cls(cls.config_class(name="t"), tok).format(row)
    assert shouted == plain.format({**row, "completion": " ABC"}) and shouted != plain.format(row)


def test_the_dataset_example_is_registered_with_both_splits():
    loader, _ = registered_datasets(plugin_manager(example("register_datasets")))["sort-completions"]
    train, test = loader("train"), loader("test")
    assert train.column_names == test.column_names == ["prompt", "completion"] and len(train) and len(test)
    assert not set(train["prompt"]) & set(test["prompt"])
    for row in train:
        digits = row["prompt"].removeprefix("sort: ").removesuffix(" =").split()
        assert row["completion"].split() == sorted(digits)


def test_the_reward_example_scores_per_completion():
    """(tests/methods/grpo/test_grpo_rollout.py installs it as a distribution and selects it by name.)"""
    module = example("register_rewards")
    assert module.char_penalty(["p"] * 3, ["12", "x" * 30, "y"], max_chars=[10, 10, None]) == [0.0, -0.2, None]
    assert module.char_penalty(["p"], ["x" * 30]) == [None]


def test_the_lifecycle_examples_run_and_do_what_they_say(tmp_path, monkeypatch, capsys):
    modules = {hook: example(hook) for hook in ("on_train_start", "on_step_end", "on_log", "on_save", "on_train_end")}
    real_run, asked = alignkit.run, []
    monkeypatch.setattr(alignkit, "run", lambda method, **kw: asked.append((method, kw)))
    eval_log = example("on_evaluate")  # its last line starts a run: recorded, then run below on a short config
    monkeypatch.setattr(alignkit, "run", real_run)
    assert [m for m, _ in asked] == ["orpo"] and isinstance(asked[0][1]["plugins"], PluginManager)
    pm = plugin_manager(alignkit_orpo, *modules.values(), eval_log.EvalLog())
    real_run("orpo", fast(tmp_path, save_steps=2, eval_steps=2), plugins=pm)
    out, rows = tmp_path / "out", read_jsonl(tmp_path / "out" / "metrics.jsonl")
    printed = capsys.readouterr().out
    assert re.search(r"^orpo: [\d,]+ trainable parameters, 32 training examples, 4 steps$", printed, re.M), printed
    assert re.search(r"^orpo finished at step 4 \(0 skipped\): \{'loss': .*'eval_loss': .*\}$", printed, re.M), printed
    losses = modules["on_step_end"].losses
    assert sorted(losses) == [1, 2, 3, 4] and losses[modules["on_step_end"].best_step()] == min(losses.values())
    logged = [r for r in rows if "loss" in r]
    csv = (out / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss,learning_rate" and len(csv) == 1 + len(logged) == 5
    for line, row in zip(csv[1:], logged):
        step, loss, lr = line.split(",")
        assert int(step) == row["step"] and float(loss) == pytest.approx(row["loss"], rel=1e-6)
        assert float(lr) == pytest.approx(row["learning_rate"], rel=1e-6)
    evals = read_jsonl(out / "evals.jsonl")
    assert [e["step"] for e in evals] == [r["step"] for r in rows if "eval_loss" in r] and evals[-1]["step"] == 4
    saved = read_jsonl(out / "saved.jsonl")
    assert saved[0]["step"] == 2 and {s["step"] for s in saved} <= {2, 4}  # the last step saves the model instead
    assert all("model.safetensors" in s["files"] and s["path"].startswith(str(out)) for s in saved), saved
