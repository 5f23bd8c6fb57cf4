"""Per-method demo data: register_datasets, Method.demo_data / demo_defaults / progress_metrics."""

import hashlib
import json

import pytest

import alignkit
import alignkit_orpo
from alignkit import ConfigError, DataError, PluginError, hookimpl, load_config
from alignkit.engine.data import load_data
from alignkit.engine.reporting import ProgressBar
from alignkit.plugins import build_registry
from alignkit.testing import plugin_manager
from helpers import fast
from toy_method import DEMO_DEFAULTS, ToyPlugin


def test_a_method_trains_on_its_demo_data_with_its_demo_settings():
    pm = plugin_manager(alignkit_orpo, ToyPlugin())
    cfg, _ = load_config("toy", plugins=pm)
    assert (cfg.data.train, cfg.data.eval, cfg.data.eval_split) == ("builtin:toy-sort", "builtin:toy-sort", "test")
    assert cfg.train.learning_rate == DEMO_DEFAULTS["train.learning_rate"]
    assert cfg.train.per_device_eval_batch_size == 25
    real, _ = load_config("toy", {"model": {"name_or_path": "some/model"}}, plugins=pm)
    assert real.data.train == "builtin:toy-sort" and real.train.learning_rate == 5e-5  # no demo settings
    theirs, _ = load_config("toy", {"data": {"train": "builtin:sort-chat"}}, plugins=pm)
    assert (theirs.data.train == "builtin:sort-chat"
            and theirs.train.learning_rate == DEMO_DEFAULTS["train.learning_rate"])


def test_a_method_without_demo_data_needs_data_train_before_anything_is_written(tmp_path):
    pm = plugin_manager(alignkit_orpo, ToyPlugin(demo_data=None))
    cfg, _ = load_config("toy", plugins=pm)
    assert cfg.data.train is None  # `alignkit config` still works
    with pytest.raises(ConfigError, match=r"^data.train: method 'toy' ships no demo data; give your training data "
                                          r"with data.train=FILE"):
        alignkit.run("toy", fast(tmp_path), plugins=pm)
    assert not (tmp_path / "out").exists()


def test_dataset_names_are_unique_across_plugins():
    class Again:
        @hookimpl
        def register_datasets(self, register):
            register("sort", lambda split: None)

    with pytest.raises(PluginError, match="dataset 'sort' is registered twice: by alignkit and by"):
        build_registry(plugin_manager(alignkit_orpo, Again()))


def test_unknown_builtin_lists_the_registered_ones():
    builtins = build_registry(plugin_manager(alignkit_orpo, ToyPlugin())).datasets
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:nope' split 'train'; choose from "
                                        "builtin:arithmetic, builtin:shapes-pairs, builtin:shapes-prompts, "
                                        "builtin:sort, builtin:sort-chat, builtin:sort-prompts, builtin:toy-sort"):
        load_data("builtin:nope", "train", builtins)
    assert len(load_data("builtin:toy-sort", "test", builtins)) == 200


def digest(ds) -> str:
    return hashlib.sha256(json.dumps(ds.to_list(), sort_keys=True).encode()).hexdigest()[:16]


def test_sort_data_moved_to_the_core_unchanged():
    """Digests of builtin:sort / sort-chat as the core shipped them before the move (ORPO's default job and
    its parity with TRL depend on this exact data)."""
    assert {(name, split): digest(load_data(f"builtin:{name}", split)) for name in ("sort", "sort-chat")
            for split in ("train", "test")} == EXPECTED_DIGESTS


def test_shipped_preference_methods_use_the_cores_demo_data_by_name():
    import alignkit_cpo
    import alignkit_dpo
    import alignkit_simpo

    pm = plugin_manager(alignkit_orpo, alignkit_dpo, alignkit_cpo, alignkit_simpo)
    for name in ("orpo", "dpo", "cpo", "simpo"):
        method = alignkit.get_method(name, pm)
        cfg, _ = load_config(name, plugins=pm)
        assert method.demo_data == "sort" and method.progress_metrics == ("rewards/accuracies",)
        assert cfg.data.train == "builtin:sort" and cfg.train.learning_rate == 3e-3
        assert cfg.train.num_train_epochs == (2 if name == "orpo" else 1)


def test_progress_bar_shows_the_loss_and_the_methods_progress_metrics():
    bar = ProgressBar(disable=True, shown=("accuracy",))
    bar.bar = type("Bar", (), {"update": lambda self, n: None,
                               "set_postfix": lambda self, d, refresh: setattr(self, "shown", d)})()
    run = type("Run", (), {"max_steps": 10})()  # the bar closes at the last step
    bar.on_step_end(run=run, step=1, metrics={"loss": 0.5, "accuracy": 0.25, "rewards/accuracies": 1.0})
    assert bar.bar.shown == {"loss": "0.5", "accuracy": "0.25"}


EXPECTED_DIGESTS = {("sort", "train"): "fd5a0189a0f4bd92", ("sort", "test"): "8d3595ab7a467c5f",
                    ("sort-chat", "train"): "41d68643e4b4f75b", ("sort-chat", "test"): "43d231234169bfa9"}


def test_a_loader_that_returns_no_dataset_is_named():
    class Broken:
        @hookimpl
        def register_datasets(self, register):
            register("broken", lambda split: [{"prompt": "x"}])

    builtins = build_registry(plugin_manager(Broken())).datasets
    with pytest.raises(DataError,
                       match="^builtin:broken: the loader registered by .* returned list, not a datasets.Dataset$"):
        load_data("builtin:broken", "train", builtins)
