"""Lifecycle hooks are scoped to the methods of the plugin that implements them (docs/hooks.md)."""

import alignkit
import alignkit_orpo
from alignkit import hookimpl
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl
from toy_method import ToyPlugin


class Watcher:
    """Registers no method: sees every run."""

    def __init__(self):
        self.methods = []

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        self.methods.append(run.method.name)


def test_two_methods_sharing_a_config_field_see_only_their_own_hooks(tmp_path):
    """ORPO and toy both have method.generate_during_eval. ORPO's sampling hook runs for ORPO runs only (for
    toy it used to run and fail with KeyError 'prompt_input_ids'); toy's hook runs for toy runs only."""
    toy, watcher = ToyPlugin(), Watcher()
    pm = plugin_manager(alignkit_orpo, toy, watcher)
    alignkit.run("toy", fast(tmp_path / "toy", max_steps=2), plugins=pm, **{"method.generate_during_eval": True})
    assert not (tmp_path / "toy" / "out" / "completions.jsonl").exists()
    assert [m for m, _ in toy.evaluations] == ["toy"]
    alignkit.run("orpo", fast(tmp_path / "orpo", max_steps=2), plugins=pm,
                 **{"method.generate_during_eval": True, "method.max_length": 32, "method.max_prompt_length": 16})
    rows = read_jsonl(tmp_path / "orpo" / "out" / "completions.jsonl")
    assert len(rows) == 4 and rows[0]["prompt"].startswith("sort:")
    assert [m for m, _ in toy.evaluations] == ["toy"]  # not called for the ORPO run
    assert watcher.methods == ["toy", "orpo"]
    # the engine's own observers watch every run: both wrote metrics.jsonl
    assert ((tmp_path / "toy" / "out" / "metrics.jsonl").exists()
            and (tmp_path / "orpo" / "out" / "metrics.jsonl").exists())


def test_a_method_plugin_may_watch_every_run(tmp_path):
    toy = ToyPlugin(all_runs=True)
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=plugin_manager(alignkit_orpo, toy))
    assert [m for m, _ in toy.evaluations] == ["orpo"]


def test_scoping_also_holds_for_a_method_object_from_outside_the_registry(tmp_path):
    """The engine finds the owning plugin by method name when Method.plugin is not filled (ORPOTrainer passes
    alignkit_orpo.METHOD itself)."""
    from alignkit.plugins import RunHooks

    toy = ToyPlugin()
    pm = plugin_manager(alignkit_orpo, toy)
    assert alignkit_orpo.METHOD.plugin == ""
    hooks = RunHooks(pm, alignkit_orpo.METHOD)
    assert toy in hooks.excluded and alignkit_orpo not in hooks.excluded
    registered = alignkit.get_method("toy", pm)
    assert registered.plugin and RunHooks(pm, registered).excluded == [alignkit_orpo]
