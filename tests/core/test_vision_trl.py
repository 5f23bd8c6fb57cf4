"""Issue 25, item 4, re-checked in the suite: SFT and DPO on the tiny vision-language model equal TRL 1.16's
SFTTrainer and DPOTrainer (eval metrics, one step's loss and every parameter's gradient) within 1e-5, as
benchmarks/compare_vlm_with_trl.py measures them (benchmarks/vlm-parity.md)."""

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_vlm_with_trl  # noqa: E402

ROWS = 4


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm-parity")
    compare_vlm_with_trl.make_inputs(path, ROWS)
    return path


@pytest.mark.parametrize("case", ["sft", "dpo"])
def test_vision_language_training_equals_trl(work, case):
    worst, metric_rows, gradient_rows = compare_vlm_with_trl.compare_case(work, case, ROWS)
    compared = [r for r in metric_rows if "not computed" not in r]
    assert len(compared) >= 3 and len(gradient_rows) == 1  # metrics and a gradient check really ran
    assert worst <= 1e-5, "\n".join(metric_rows + gradient_rows)
