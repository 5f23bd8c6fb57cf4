import os

# Nothing in the tests may reach the network (CI has none): fail fast instead of retrying. Set before
# anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tests are grouped by subject (core/, methods/<name>/, trl/) but import each other's support by module name
# (`from test_orpo_chunked import ragged_batch`), as when the folder was flat: every folder that holds test
# modules goes on sys.path (pytest's rootdir-less "prepend" mode puts only this folder and a test's own there).
# Module names stay unique across folders for the same reason.
for _folder in sorted({p.parent for p in Path(__file__).parent.rglob("*.py")}):
    if str(_folder) not in sys.path:
        sys.path.insert(1, str(_folder))

import alignkit_orpo  # noqa: E402
from alignkit.testing import plugin_manager, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def pm():
    """A fresh manager with only the ORPO plugin, registered in-process."""
    return plugin_manager(alignkit_orpo)


@pytest.fixture
def only_installed_orpo(monkeypatch):
    """Load only the installed `alignkit` entry point (the ORPO plugin), not every plugin in the environment."""
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit")
