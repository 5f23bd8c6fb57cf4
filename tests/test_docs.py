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
    assert len(specs) == 10
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


def test_writing_a_method_guide_runs(tmp_path):
    guide = (ROOT / "docs" / "writing-a-method.md").read_text()
    plugin_code, test_code = code_blocks(guide, "python")
    module = types.ModuleType("alignkit_hinge")
    exec(compile(plugin_code, "writing-a-method.md", "exec"), module.__dict__)
    assert len(plugin_code.strip().splitlines()) <= 45  # "a few dozen lines"
    namespace = {"hinge_plugin": module}
    exec(compile(test_code, "writing-a-method.md", "exec"), namespace)
    namespace["test_hinge_trains"](tmp_path)
    toml = code_blocks(guide, "toml")[0]
    assert 'hinge = "alignkit_hinge"' in toml and 'name = "alignkit-hinge"' in toml
