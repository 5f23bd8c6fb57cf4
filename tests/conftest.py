import os

# Nothing in the tests may reach the network (CI has none): fail fast instead of retrying. Set before
# anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

import alignkit_orpo
from alignkit.testing import plugin_manager, tiny_tokenizer


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def pm():
    """A fresh manager with only the ORPO plugin, registered in-process."""
    return plugin_manager(alignkit_orpo)


