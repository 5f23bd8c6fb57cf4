"""KTOTrainer as TRL 1.16's KTOTrainer behaves beyond alignkit's own surface: compute_metrics, ..."""

import datasets
from alignkit_trl import KTOConfig, KTOTrainer


def unpaired(n=8):
    return datasets.Dataset.from_list([{"prompt": f"say {w}", "completion": f" {w} {w}", "label": i % 2 == 0}
                                       for i, w in enumerate("abcdefghijkl"[:n])])


def config(tmp_path, **args):
    return KTOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **args)


def test_compute_metrics_gets_the_logits_and_input_ids_at_every_evaluation(tmp_path):
    seen = []

    def compute_metrics(pred):
        seen.append((pred.predictions.shape, pred.label_ids.shape))
        return {"test": 0.5}

    args = config(tmp_path, max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                  eval_strategy="steps", eval_steps=1)
    t = KTOTrainer("builtin:tiny", args=args, train_dataset=unpaired(), eval_dataset=unpaired(4),
                   compute_metrics=compute_metrics)
    t.train()
    assert [r["eval_test"] for r in t.state.log_history if "eval_loss" in r] == [0.5, 0.5]
    assert seen[0][0][:2] == seen[0][1] and seen[0][1][0] == 4


def test_sync_ref_model_mixes_the_policy_into_the_reference_every_k_steps(tmp_path):
    import torch

    args = config(tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, sync_ref_model=True,
                  ref_model_sync_steps=2, ref_model_mixup_alpha=0.25)
    t = KTOTrainer("builtin:tiny", args=args, train_dataset=unpaired())
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    ref = dict(t.ref_model.named_parameters())
    for name, p in t.model.named_parameters():
        torch.testing.assert_close(ref[name], 0.25 * p.detach() + 0.75 * start[name])
    assert any(not p.equal(start[n]) for n, p in t.model.named_parameters())


def test_evaluating_a_new_dataset_after_training_with_a_precomputed_reference_is_refused_as_trl(tmp_path):
    import pytest

    args = config(tmp_path, max_steps=1, per_device_train_batch_size=4, precompute_ref_log_probs=True)
    t = KTOTrainer("builtin:tiny", args=args, train_dataset=unpaired())
    assert t.evaluate(eval_dataset=unpaired(4))["eval_loss"] is not None  # before training: the model is the reference
    t.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to `evaluate"):
        t.evaluate(eval_dataset=unpaired(4))


def test_tokenized_rows_show_trls_prompt_and_completion_ids_and_the_collator_trls_masks(tmp_path):
    rows = datasets.Dataset.from_dict({"prompt": ["Hi", "a very long prompt that fills the whole budget alone"],
                                       "completion": [" there", " yes"], "label": [True, False]})
    t = KTOTrainer("builtin:tiny", args=config(tmp_path, max_length=6), train_dataset=rows, eval_dataset={"a": rows})
    tok = t.processing_class
    assert len(t.train_dataset) == 1  # the long prompt leaves no completion token: dropped
    row = t.train_dataset[0]
    assert row["prompt_ids"] == tok("Hi")["input_ids"]
    assert tok.decode(row["completion_ids"]) == " there" + tok.eos_token
    assert "prompt_ids" in t.eval_dataset["a"].column_names
    batch = t.data_collator([row])
    assert batch["input_ids"][0].tolist() == row["prompt_ids"] + row["completion_ids"]
    assert batch["completion_mask"][0].tolist() == [0] * len(row["prompt_ids"]) + [1] * len(row["completion_ids"])
    assert "KL_completion_mask" in batch
