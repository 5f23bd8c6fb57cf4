"""One demo-defaults helper in the core (alignkit.blocks.demo.demo_defaults), used by every shipped method: the demo
settings stay what each method shipped before, and no plugin spells the common dict out again."""

from pathlib import Path

import pytest

import alignkit
from alignkit.testing import plugin_manager

ROOT = Path(__file__).resolve().parents[2]

#: the common settings every demo used, as the plugins spelled them out before the helper
COMMON = {
    "train.per_device_train_batch_size": 16, "train.per_device_eval_batch_size": 50, "train.warmup_ratio": 0.05,
    "train.logging_steps": 10, "train.eval_steps": 50, "train.save_steps": 100, "train.save_total_limit": 2,
    "train.eval_on_start": True,
}
BEFORE = {
    "orpo": {**COMMON, "train.learning_rate": 3e-3, "train.num_train_epochs": 2},
    "sft": {**COMMON, "train.learning_rate": 3e-3, "train.num_train_epochs": 2},
    "dpo": {**COMMON, "train.learning_rate": 3e-3, "train.num_train_epochs": 1},
    "cpo": {**COMMON, "train.learning_rate": 3e-3, "train.num_train_epochs": 1},
    "simpo": {**COMMON, "train.learning_rate": 3e-3, "train.num_train_epochs": 1},
    "kto": {**COMMON, "train.learning_rate": 2e-3, "train.num_train_epochs": 1},
    "grpo": {
        "method.sft_warmup_steps": 150, "method.num_generations": 8, "method.max_completion_length": 14,
        "method.reward_funcs": ["sort-order", "exact-match"], "method.temperature": 1.0,
        "train.learning_rate": 3e-4, "train.per_device_train_batch_size": 16, "train.per_device_eval_batch_size": 64,
        "train.max_steps": 120, "train.warmup_ratio": 0.0, "train.logging_steps": 5, "train.eval_steps": 40,
        "train.save_steps": 40, "train.save_total_limit": 2, "train.eval_on_start": True,
        "data.max_eval_samples": 64,
    },
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_each_demo_keeps_its_settings(name):
    import importlib

    module = importlib.import_module("alignkit_orpo" if name == "orpo" else f"alignkit_{name}")
    method = alignkit.get_method(name, plugin_manager(module))
    assert dict(method.demo_defaults) == BEFORE[name]


def test_the_helper_overrides_and_extends_the_common_settings():
    from alignkit.blocks.demo import demo_defaults

    assert demo_defaults() == {**COMMON, "train.learning_rate": 3e-3, "train.num_train_epochs": 1}
    got = demo_defaults(learning_rate=1e-3, num_train_epochs=3, **{"method.beta": 0.5, "train.eval_steps": 7})
    assert got == {**COMMON, "train.learning_rate": 1e-3, "train.num_train_epochs": 3, "method.beta": 0.5,
                   "train.eval_steps": 7}
    with pytest.raises(ValueError, match="not a dotted key"):
        demo_defaults(beta=0.5)


def test_no_plugin_copies_the_demo_settings():
    for path in [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "alignkit_orpo").glob("*.py")]:
        assert "save_total_limit" not in path.read_text(), path
