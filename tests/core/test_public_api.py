"""The declared public API: shipped plugins (alignkit_orpo included) import only the public wings of alignkit,
and every name they import is exported and listed in docs/api.md."""

import ast
import importlib
import re
from pathlib import Path

import pytest

import alignkit
from helpers import ROOT

PUBLIC = ("alignkit.plugin", "alignkit.blocks", "alignkit.formatters", "alignkit.online", "alignkit.testing",
          "alignkit.trainer_facade")
PLUGIN_SOURCES = [ROOT / "alignkit_orpo", *sorted((ROOT / "plugins").glob("alignkit-*/alignkit_*"))]


def imports_of_alignkit(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) for each name a file imports from alignkit (name "" for `import alignkit.x`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "alignkit" or node.module.startswith("alignkit."):
                found += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("alignkit.")]
    return found


def plugin_imports() -> list[tuple[str, str, str]]:
    out = []
    for source in PLUGIN_SOURCES:
        for path in sorted(source.rglob("*.py")):
            out += [(f"{path.relative_to(ROOT)}:{line}", module, name)
                    for module, name, line in imports_of_alignkit(path)]
    return out


def test_the_scan_sees_every_shipped_plugin():
    assert {p.name for p in PLUGIN_SOURCES} >= {"alignkit_orpo", "alignkit_dpo", "alignkit_cpo", "alignkit_simpo",
                                                "alignkit_sft", "alignkit_kto", "alignkit_grpo",
                                                "alignkit_distill", "alignkit_rloo", "alignkit_reward"}
    assert len(plugin_imports()) > 30


def test_plugins_import_only_the_public_api():
    wrong = []
    for where, module, name in plugin_imports():
        if module == "alignkit":
            if name not in alignkit.__all__:
                wrong.append(f"{where}: alignkit.{name} is not in alignkit.__all__")
        elif (not (module in PUBLIC or module.startswith(tuple(p + "." for p in PUBLIC)))
              or any(part.startswith("_") for part in module.split("."))):
            wrong.append(f"{where}: {module} is not a public module")
        elif name.startswith("_"):
            wrong.append(f"{where}: {module}.{name} is private")
    assert not wrong, "\n".join(wrong)


def test_every_imported_name_is_exported_and_documented():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = []
    for where, module, name in plugin_imports():
        if module != "alignkit" and name:
            assert hasattr(importlib.import_module(module), name), f"{where}: {module}.{name}"
            if name != "*" and not re.search(rf"`{re.escape(module)}\.{re.escape(name)}\b", doc) \
                    and not re.search(rf"`{re.escape(name)}\b", doc):
                missing.append(f"{module}.{name} ({where})")
    for name in alignkit.__all__:
        if not re.search(rf"`(alignkit\.)?{re.escape(name)}\b", doc):
            missing.append(f"alignkit.{name}")
    assert not missing, "not in docs/api.md: " + ", ".join(sorted(set(missing)))


def test_the_engine_is_private_and_the_core_imports_no_plugin():
    for path in (ROOT / "alignkit").rglob("*.py"):
        for module, _, line in imports_of_alignkit(path):
            assert not module.startswith(("alignkit_",)), f"{path}:{line}"
    for wing in ("plugin", "blocks", "formatters", "online"):  # public wings never reach into the engine or CLI
        for path in (ROOT / "alignkit" / wing).rglob("*.py"):
            for module, _, line in imports_of_alignkit(path):
                assert not module.startswith(("alignkit.engine", "alignkit.cli")), f"{path}:{line}: {module}"


@pytest.mark.parametrize("bad", ["from alignkit.engine.loop import Engine", "import alignkit.engine.rundir",
                                 "from alignkit.blocks.logps import _private"])
def test_the_check_catches_a_private_import(tmp_path, bad):
    path = tmp_path / "plugin.py"
    path.write_text(bad + "\n")
    (module, name, _), = imports_of_alignkit(path)
    assert not module.startswith(PUBLIC) or name.startswith("_")
