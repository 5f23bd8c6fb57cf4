"""TRL 1.16's RewardTrainer run for real (trl is in the test extra) on two cases of benchmarks/
compare_reward_with_trl.py: eval metrics and one step's gradients equal alignkit's."""

import sys

from helpers import ROOT


def test_eval_metrics_and_gradients_equal_trl(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_reward_with_trl as cmp

    cases = ("max-length", "conversational-margin-center")  # standard rows (a pair dropped), chat rows + margin
    monkeypatch.setattr(cmp, "CASES", {k: cmp.CASES[k] for k in cases})
    monkeypatch.setattr(cmp, "GRADIENT_CASES", cases)
    cmp.make_inputs(tmp_path)
    ours, theirs = cmp.alignkit_side(tmp_path), cmp.trl_side(tmp_path)
    _, worst, only_trl, _ = cmp.compare(ours, theirs)
    assert worst <= 1e-5
    assert only_trl == {"eval_min_reward", "eval_max_reward"}
    for case in cases:  # the comparison covered TRL's loss and metrics, and losses that are not trivially log 2
        assert {"eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"} <= set(ours[case])
        assert abs(theirs[case]["eval_loss"] - 0.6931) > 0.01
    _, padded_worst = cmp.compare_gradients(tmp_path, share_prompt=False)  # TRL's batch layout: equal to 1e-5
    assert padded_worst <= 1e-5
    _, shared_worst = cmp.compare_gradients(tmp_path)
    # the default: pairs share their prompt's forward (method.share_prompt), the same sums over other shapes, so
    # float32 rounding of the gradients up to ~2e-5 of a tensor's largest entry, as reordered rows give
    assert shared_worst <= 5e-5
