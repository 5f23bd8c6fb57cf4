"""`alignkit eval` reports exactly what the end-of-training evaluation reports, hooks included."""

import json

import pytest

import alignkit
import alignkit_orpo
from alignkit.testing import plugin_manager
from helpers import fast
from toy_method import ToyPlugin


@pytest.mark.parametrize("method", ["toy", "orpo"])
def test_eval_equals_the_evaluation_at_the_end_of_training(tmp_path, method):
    toy = ToyPlugin(all_runs=True)
    pm = plugin_manager(alignkit_orpo, toy)
    trained = alignkit.run(method, fast(tmp_path, max_steps=3), plugins=pm)
    at_end = {k: v for k, v in trained.metrics.items() if k.startswith("eval_")}
    assert toy.evaluations[-1] == (method, at_end)
    overrides = {"model.name_or_path": str(trained.output_dir), "train.output_dir": str(tmp_path / "eval"),
                 "data.max_eval_samples": 8, "train.per_device_eval_batch_size": 4}
    evaluated = alignkit.evaluate(method, plugins=pm, **overrides)
    assert evaluated.keys() == at_end.keys()
    for key, value in at_end.items():
        assert evaluated[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert toy.evaluations[-1] == (method, evaluated)  # on_evaluate ran for `alignkit eval` too
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text()) == evaluated
