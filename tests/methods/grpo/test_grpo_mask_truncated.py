"""mask_truncated_completions when every completion of a step is truncated: nothing is trained and the loss is 0,
as TRL's clamp(min=1) of the token count gives, instead of 0/0 = NaN (which stopped the run)."""

import alignkit_grpo
import pytest
import torch

import alignkit
from alignkit.blocks.logps import count_weights
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl


def test_a_unit_that_counts_nothing_divides_by_one():
    out = alignkit.LossOutput(terms={"tokens": torch.tensor(0.0), "completions": torch.tensor(3.0)})
    assert out.normalized({"tokens": 0, "completions": 2}).item() == 1.5
    assert count_weights({"tokens": 0, "completions": 4}) == {"tokens": 1.0, "completions": 0.25}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_every_completion_truncated_and_masked_trains_nothing_without_nan(tmp_path, loss_type):
    config = fast(tmp_path, max_steps=2, learning_rate=1e-2)
    config["method"] = {"num_generations": 4, "max_completion_length": 2, "sft_warmup_steps": 0,
                        "mask_truncated_completions": True, "loss_type": loss_type, "temperature": 0.05,
                        "reward_funcs": ["exact-match"]}
    result = alignkit.run("grpo", config, plugins=plugin_manager(alignkit_grpo))
    rows = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["completions/clipped_ratio"] for r in rows] == [1.0, 1.0]  # the fixture: all truncated
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)
