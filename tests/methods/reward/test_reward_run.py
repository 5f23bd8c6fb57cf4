"""A reward run end to end: full and LoRA (the head trained and saved with the adapter), the saved folder loads with
AutoModelForSequenceClassification and gives the eval's numbers, `alignkit eval` agrees, `alignkit format` shows
what is read."""

import pytest
import torch
from click.testing import CliRunner
from reward_support import reward_pm, scores, train
from safetensors import safe_open
from test_reward_as_model_reward import eval_rows
from transformers import AutoModelForSequenceClassification

import alignkit
from alignkit.cli.commands import cli


@pytest.mark.parametrize("peft", [None, {"r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_the_saved_reward_model_reproduces_its_eval(tmp_path, peft):
    pm, result = train(tmp_path, steps=16, model={"peft": peft} if peft else {})
    out = result.output_dir
    assert result.metrics["eval_accuracy"] > 0.6  # it learned something in 16 steps
    if peft:
        from peft import PeftModel

        with safe_open(out / "adapter_model.safetensors", "pt") as f:
            assert any("score" in k for k in f.keys()), "the adapter holds no score head"
        cfg, _ = alignkit.load_config(None, str(out / "config.yaml"), plugins=pm)
        base = alignkit.load_model(cfg.model.model_copy(update={"peft": None}), alignkit.load_tokenizer(cfg.model),
                                   cfg.train.seed, "sequence-classifier", 1)
        model = PeftModel.from_pretrained(base, str(out)).eval()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    _, features = eval_rows(pm, result)
    chosen = scores(model, [f["chosen_ids"] for f in features])
    rejected = scores(model, [f["rejected_ids"] for f in features])
    assert (chosen > rejected).float().mean().item() == pytest.approx(result.metrics["eval_accuracy"])
    assert (chosen - rejected).mean().item() == pytest.approx(result.metrics["eval_margin"], rel=1e-4)
    assert torch.cat([chosen, rejected]).mean().item() == pytest.approx(result.metrics["eval_mean_reward"], rel=1e-4,
                                                                        abs=1e-5)
    evaluated = alignkit.evaluate(None, plugins=pm, **{"model.name_or_path": str(out),
                                                        "train.output_dir": str(tmp_path / "eval")})
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_rewards/chosen", "eval_rewards/rejected"):
        assert evaluated[key] == pytest.approx(result.metrics[key], rel=1e-4, abs=1e-6), key


def test_format_shows_each_sequence_and_its_margin(tmp_path, monkeypatch):
    import alignkit.plugins

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1", "margin": 1.5}\n' * 2)
    monkeypatch.setattr(alignkit.plugins, "get_plugin_manager", lambda *a, **k: reward_pm())
    run = CliRunner().invoke(cli, ["format", "--method", "reward", f"data.train={data}", "-n", "1"])
    assert run.exit_code == 0, run.output
    assert "chosen (8 tokens, 0 labelled):\n  sort: 3 1 = 1 3</s>\n" in run.output
    assert "rejected (8 tokens, 0 labelled):\n  sort: 3 1 = 3 1</s>\n" in run.output and "margin: 1.5" in run.output
    assert "its score at each sequence's last token is that sequence's reward" in run.output


def test_the_recipe_trains(tmp_path):
    from helpers import ROOT

    result = alignkit.run(None, str(ROOT / "configs" / "reward.yaml"), plugins=reward_pm(), **{
        "train.output_dir": str(tmp_path / "out"), "train.max_steps": 3, "data.max_train_samples": 48,
        "data.max_eval_samples": 16, "train.eval_on_start": False, "train.plots": False, "train.save_steps": None})
    assert result.global_step == 3 and 0 <= result.metrics["eval_accuracy"] <= 1
    cfg, _ = alignkit.load_config(None, str(result.output_dir / "config.yaml"), plugins=reward_pm())
    assert cfg.method.center_rewards_coefficient == 0.01
