"""TRL 1.16's experimental OnlineDPOTrainer run for real (trl is in the test extra) on two cases of
benchmarks/compare_online_dpo_with_trl.py: its training step on fixed completions and reward functions against
alignkit's rollout stage and loss (standard prompts with missing_eos_penalty; conversational prompts with IPO and
another model as the reference): the loss, metrics and one step's gradients within 1e-5."""

import sys

from helpers import ROOT


def test_loss_metrics_and_gradients_equal_trl():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_online_dpo_with_trl as cmp

    rows = cmp.compare(["sigmoid-eos-penalty", "chat-ipo-separate-ref"])
    for row in rows:
        assert {"objective/scores", "objective/scores_margin", "rewards/margins", "val/contain_eos_token"} <= \
            set(row["metrics_compared"]), row
        assert row["trl_loss"] > 0.1, row
        assert cmp.worst(row) <= cmp.TOL, row
