"""TRL 1.16's RLOOTrainer run for real (trl is in the test extra) on two cases of benchmarks/compare_rloo_with_trl.py:
standard and conversational prompts, KL in the reward and two optimisation passes; its scoring of the same fixed
completions and its loss against alignkit's rollout stage and fused-head loss."""

import sys

from helpers import ROOT


def test_scoring_metrics_loss_and_gradients_equal_trl():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_rloo_with_trl as cmp

    rows = cmp.compare(["kl-iterations2", "chat-kl-iterations2"])
    for row in rows:
        assert row["prompt_ids_differ"] == 0, row
        assert "kl" in row["metrics_compared"] and "reward" in row["metrics_compared"], row
        assert row["trl_loss"] > 0.01, row  # off-policy: a loss that is not ~0, compared relatively
        assert cmp.worst(row) <= 1e-5, row
