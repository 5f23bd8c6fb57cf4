"""Docs that cannot rot: every hook is documented, README examples run, CI runs the README's commands."""

import inspect
import re
import types
from pathlib import Path

import alignkit
from alignkit import hookspecs
from alignkit.testing import plugin_manager
from helpers import fast

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_every_hookspec_is_documented():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    specs = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "alignkit_spec")]
    assert {"register_methods", "register_datasets", "register_rewards", "on_train_start", "on_evaluate"} <= set(specs)
    for name in specs:
        signature = f"## {name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"
        assert signature in doc, f"docs/hooks.md lacks '{signature}'"
        assert name in README


def test_ci_runs_the_readme_commands():
    setup, tests = code_blocks(README, "bash")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup.strip() in ci and tests.strip() in ci
    assert "torch==2.13.0" in setup


def test_readme_plugin_example_trains(tmp_path):
    source = next(b for b in code_blocks(README, "python") if "register_methods" in b)
    module = types.ModuleType("readme_plugin")
    exec(compile(source, "README.md", "exec"), module.__dict__)
    import alignkit_orpo

    pm = plugin_manager(alignkit_orpo, module)
    result = alignkit.run("sigmoid-pref", fast(tmp_path), plugins=pm)
    assert result.global_step == 4 and "eval_rewards/margins" in result.metrics
    toml = code_blocks(README, "toml")[0]
    assert 'sigmoid-pref = "my_plugin_module"' in toml


def test_writing_a_method_guide_runs(tmp_path, tok):
    """The guide's SFT-style plugin (public API only, about forty lines) trains; its tests pass; its own-format
    example gives the ids of the core's prompt-completion formatter on the same conversation."""
    guide = (ROOT / "docs" / "writing-a-method.md").read_text()
    plugin_code, test_code, formatter_code = code_blocks(guide, "python")[:3]
    module = types.ModuleType("alignkit_nll")
    exec(compile(plugin_code, "writing-a-method.md", "exec"), module.__dict__)
    assert len(plugin_code.strip().splitlines()) <= 45  # "about forty lines"
    assert not re.search(r"^from alignkit\.(?!formatters|testing)|alignkit\._|helpers", plugin_code + test_code, re.M)
    namespace = {"nll_plugin": module}
    exec(compile(test_code, "writing-a-method.md", "exec"), namespace)
    namespace["test_nll_trains"](tmp_path)
    namespace["test_nll_loss_by_hand"]()
    toml = code_blocks(guide, "toml")[0]
    assert 'nll = "alignkit_nll"' in toml and 'name = "alignkit-nll"' in toml

    from alignkit.formatters import PromptCompletionFormatter, SequenceDataConfig

    own = {}
    exec(compile(formatter_code, "writing-a-method.md", "exec"), own)
    config = SequenceDataConfig(name="t", max_length=12)
    row = {"question": "sort: 2 1", "answer": "1 2"}
    core = PromptCompletionFormatter(config, tok).format({"prompt": [{"role": "user", "content": row["question"]}],
                                                         "completion": [{"role": "assistant", "content": row["answer"]}]})
    ours = own["QuestionAnswerFormatter"](config, tok).format(row)
    assert ours.features == core.features and ours.truncated == core.truncated
