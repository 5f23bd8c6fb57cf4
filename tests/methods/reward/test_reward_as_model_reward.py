"""The trained reward folder serves unchanged as a `model:PATH` reward of an online method (GRPO): it scores each
prompt + completion with the very ids it was trained on, so its ranking accuracy on its eval pairs is its eval's."""

import alignkit_grpo
import datasets
import pytest
import torch
from reward_support import reward_pm, scores, train
from transformers import AutoModelForSequenceClassification

import alignkit
from alignkit.online.rewards import RewardRegistry


def eval_rows(pm, result):
    """The run's eval rows (the test split's first ones) and their features as its formatter made them."""
    cfg, method = alignkit.load_config(None, str(result.output_dir / "config.yaml"), plugins=pm)
    rows = _test_split(cfg.data.train).select(range(cfg.data.max_eval_samples))
    formatter = method.formatter(cfg.method, alignkit.load_tokenizer(cfg.model))
    return rows, [formatter.format(r).features for r in rows]


def _test_split(train):
    from alignkit.plugins import registered_datasets

    if train.startswith("builtin:"):
        return registered_datasets(reward_pm())[train.removeprefix("builtin:")][0]("test")
    raise AssertionError(train)


@pytest.mark.parametrize("data", ["builtin:sort-reward", "builtin:sort-chat"])
def test_a_model_reward_scores_text_as_the_reward_model_was_trained(tmp_path, data):
    pm, result = train(tmp_path, data)
    rows, features = eval_rows(pm, result)
    [(_, reward)] = RewardRegistry.from_plugins(reward_pm(alignkit_grpo)).select([f"model:{result.output_dir}"])
    prompts = list(rows["prompt"])
    got_chosen = torch.tensor(reward(prompts, list(rows["chosen"])))
    got_rejected = torch.tensor(reward(prompts, list(rows["rejected"])))
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(got_chosen, scores(model, [f["chosen_ids"] for f in features]))
    torch.testing.assert_close(got_rejected, scores(model, [f["rejected_ids"] for f in features]))
    assert (got_chosen > got_rejected).float().mean().item() == pytest.approx(result.metrics["eval_accuracy"])
    assert (got_chosen - got_rejected).mean().item() == pytest.approx(result.metrics["eval_margin"], rel=1e-4)


def test_grpo_trains_with_the_reward_folder_as_its_reward(tmp_path):
    _, result = train(tmp_path / "rm")
    pm = reward_pm(alignkit_grpo)
    config = {"data": {"max_train_samples": 4, "max_eval_samples": 2},
              "method": {"reward_funcs": [f"model:{result.output_dir}"], "num_generations": 2,
                         "max_completion_length": 4},
              "train": {"output_dir": str(tmp_path / "grpo"), "max_steps": 1, "per_device_train_batch_size": 2,
                        "per_device_eval_batch_size": 2, "save_steps": None, "eval_steps": None,
                        "eval_on_start": False, "disable_tqdm": True, "plots": False}}
    grpo = alignkit.run("grpo", config, plugins=pm)
    assert grpo.global_step == 1 and "eval_reward" in grpo.metrics


def test_the_test_split_is_the_demo_data():
    assert isinstance(_test_split("builtin:sort-reward"), datasets.Dataset)


def test_a_lora_reward_folder_serves_as_a_model_reward_too(tmp_path):
    pm, result = train(tmp_path, model={"peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    assert (result.output_dir / "adapter_config.json").is_file()
    rows, _ = eval_rows(pm, result)
    [(_, reward)] = RewardRegistry.from_plugins(reward_pm(alignkit_grpo)).select([f"model:{result.output_dir}"])
    chosen = torch.tensor(reward(list(rows["prompt"]), list(rows["chosen"])))
    rejected = torch.tensor(reward(list(rows["prompt"]), list(rows["rejected"])))
    assert (chosen > rejected).float().mean().item() == pytest.approx(result.metrics["eval_accuracy"])
    assert (chosen - rejected).mean().item() == pytest.approx(result.metrics["eval_margin"], rel=1e-4, abs=1e-5)


def test_a_model_reward_that_is_not_a_classifier_is_one_line(tmp_path):
    from alignkit.testing import tiny_model, tiny_tokenizer
    from helpers import refused

    tiny_model(seed=1).save_pretrained(tmp_path / "lm")
    tiny_tokenizer().save_pretrained(tmp_path / "lm")
    out = tmp_path / "out"
    line = refused("run", "--method", "grpo", f"method.reward_funcs=[model:{tmp_path / 'lm'}]",
                   f"train.output_dir={out}", written=out)
    assert line == (f"alignkit: error: method.reward_funcs: model:{tmp_path / 'lm'} is a LlamaForCausalLM, not a "
                    "sequence classifier: its score head would be random (give a trained reward model: a "
                    "sequence-classification checkpoint with one label)")
