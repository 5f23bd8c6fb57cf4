"""DPOTrainer as TRL 1.16's DPOTrainer shows itself beyond training: its tokenized rows under TRL's column names
(prompt_ids / chosen_ids / rejected_ids), a dict of eval datasets each tokenized, and TRL's refusal to evaluate a new
dataset against a precomputed reference once the policy has trained."""

import datasets
import pytest
from alignkit_trl import DatasetMixtureConfig, DPOConfig, DPOTrainer, get_dataset


def rows(n=8):
    return get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort"}]))["train"].select(range(n))


def trainer(tmp_path, train=None, **args):
    config = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                       per_device_train_batch_size=4, **args)
    return DPOTrainer("builtin:tiny", args=config, train_dataset=train if train is not None else rows())


def test_tokenized_rows_have_trls_column_names(tmp_path):
    t = trainer(tmp_path)
    row, raw = t.train_dataset[0], rows()[0]
    tok = t.processing_class
    prompt = tok(raw["prompt"])["input_ids"]
    assert row["prompt_ids"] == prompt
    for side in ("chosen", "rejected"):  # TRL: prompt + answer + EOS encoded whole, split after the prompt's ids
        assert row[f"{side}_ids"] == tok(raw["prompt"] + raw[side] + tok.eos_token)["input_ids"][len(prompt):]


def test_each_eval_dataset_of_a_dict_is_tokenized(tmp_path):
    config = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    evals = datasets.DatasetDict({"a": rows(2), "b": rows(3)})
    t = DPOTrainer("builtin:tiny", args=config, train_dataset=rows(), eval_dataset=evals)
    assert set(t.eval_dataset) == {"a", "b"}
    assert len(t.eval_dataset["b"]) == 3 and "prompt_ids" in t.eval_dataset["b"][0]


def test_evaluating_a_new_dataset_after_training_with_a_precomputed_policy_reference_is_refused(tmp_path):
    t = trainer(tmp_path, max_steps=1, precompute_ref_log_probs=True)
    assert t.evaluate(eval_dataset=rows(4))["eval_loss"] > 0  # before training the policy is the reference
    t.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to `evaluate"):
        t.evaluate(eval_dataset=rows(4))


def test_eval_datasets_given_at_init_are_still_evaluated_after_training_with_a_precomputed_reference(tmp_path):
    config = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1, bf16=False,
                       precompute_ref_log_probs=True, per_device_train_batch_size=4)
    t = DPOTrainer("builtin:tiny", args=config, train_dataset=rows(), eval_dataset={"a": rows(2), "b": rows(3)})
    t.train()
    metrics = t.evaluate()
    assert metrics["eval_a_loss"] > 0 and metrics["eval_b_loss"] > 0
