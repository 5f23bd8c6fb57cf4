"""Online DPO runs in-process through the engine with the DPO loss family (a weighted list of loss types with
sft) and with LoRA (the reference: the policy with its adapters off)."""

import alignkit_dpo
import pytest

import alignkit
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl


def _run(tmp_path, method: dict, **extra):
    config = fast(tmp_path, max_steps=2, learning_rate=1e-3)
    config["method"] = {"reward_funcs": ["exact-match"], "max_new_tokens": 6, "missing_eos_penalty": 0.5,
                        "sft_warmup_steps": 0, **method}  # the demo's warm-up would train the adapters before step 1
    config.update(extra)
    result = alignkit.run("online-dpo", config, plugins=plugin_manager(alignkit_dpo))
    return [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]


def test_a_weighted_list_of_dpo_loss_types_trains_online(tmp_path):
    rows = _run(tmp_path, {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]})
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] > 0 and r["objective/scores_margin"] >= 0  # the chosen sample never scores lower
        assert 0 <= r["val/contain_eos_token"] <= 1 and r["completions/mean_length"] <= 6
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the first step: the policy is its reference
    assert rows[1]["objective/kl"] != pytest.approx(0.0, abs=1e-5)


def test_a_pairwise_judge_replaces_the_rewards(tmp_path):
    rows = _run(tmp_path, {"judge": "judge:builtin:tiny", "reward_funcs": [], "missing_eos_penalty": None})
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    # the ranking scores are the judge's probabilities: in [0, 1], chosen >= rejected, each pair summing to 1
    assert all(r["objective/scores_margin"] >= 0 and r["objective/scores"] == pytest.approx(0.5) for r in rows)


def test_lora_trains_against_the_policy_with_its_adapters_off(tmp_path):
    """LoRA's dropout (0.05) is off as TRL's disable_dropout does: at step 1 the policy scores as its reference."""
    rows = _run(tmp_path, {}, model={"peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["objective/kl"] != pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("method", ["dpo", "online-dpo"])
@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_turns_off_every_dropout_lora_included(tmp_path, method, disable):
    """TRL's DPOTrainer and OnlineDPOTrainer set every dropout to 0 (disable_dropout=True), LoRA's included."""
    import torch

    from alignkit.engine.loop import Engine

    cfg, m = alignkit.load_config(method, None, {"model.peft": {"r": 4, "target_modules": ["q_proj"], "dropout": 0.05},
                                                 "method.disable_dropout": disable,
                                                 "train.output_dir": str(tmp_path / "out")},
                                  plugins=plugin_manager(alignkit_dpo))
    engine = Engine(cfg, m, plugin_manager(alignkit_dpo)).load()
    rates = {d.p for d in engine.model.modules() if isinstance(d, torch.nn.Dropout)}
    assert rates == ({0.0} if disable else {0.05})
