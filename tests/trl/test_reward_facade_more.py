"""RewardTrainer as TRL 1.16's RewardTrainer shows itself beyond training: its tokenized rows under TRL's column names
(chosen_ids / rejected_ids), pre-tokenized rows (and TRL's older names, with its FutureWarning), compute_metrics on
the scores, and TRL's refusal of a classifier with more than one label."""

import warnings

import numpy as np
import pytest
import torch
from alignkit_trl import DatasetMixtureConfig, RewardConfig, RewardTrainer, get_dataset
from transformers import AutoModelForSequenceClassification

from alignkit.testing import tiny_model, tiny_tokenizer


def rows(n=8, start=0):
    return get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-reward"}]))["train"].select(
        range(start, start + n))


def config(tmp_path, **args):
    return RewardConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        per_device_train_batch_size=4, bf16=False, **args)


def test_tokenized_rows_have_trls_column_names(tmp_path):
    t = RewardTrainer("builtin:tiny", args=config(tmp_path), train_dataset=rows())
    row, raw, tok = t.train_dataset[0], rows()[0], t.processing_class
    assert {"chosen_ids", "rejected_ids"} <= set(t.train_dataset.column_names)
    assert "chosen_input_ids" not in t.train_dataset.column_names
    for side in ("chosen", "rejected"):  # TRL: prompt + answer + EOS, tokenized whole
        assert row[f"{side}_ids"] == tok(raw["prompt"] + raw[side] + tok.eos_token)["input_ids"]


@pytest.mark.parametrize("names", [("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")])
def test_pretokenized_rows_train_exactly_as_the_same_text_rows(tmp_path, names):
    text = rows()
    t = RewardTrainer("builtin:tiny", args=config(tmp_path / "text", max_steps=2), train_dataset=text)
    tok = t.processing_class
    tokenized = text.map(lambda r: {names[0]: tok(r["prompt"] + r["chosen"] + tok.eos_token)["input_ids"],
                                    names[1]: tok(r["prompt"] + r["rejected"] + tok.eos_token)["input_ids"]},
                         remove_columns=["prompt", "chosen", "rejected"])
    legacy = names[0] == "chosen_input_ids"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u = RewardTrainer("builtin:tiny", args=config(tmp_path / "ids", max_steps=2), train_dataset=tokenized)
    assert any(issubclass(w.category, FutureWarning) and "will not be supported in v1" in str(w.message)
               for w in caught) == legacy  # TRL's warning for its older names only
    assert u.train_dataset["chosen_ids"] == t.train_dataset["chosen_ids"]
    assert "chosen_input_ids" not in u.train_dataset.column_names
    t.train()
    u.train()
    for (name, a), b in zip(t.model.named_parameters(), u.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_compute_metrics_gets_the_scores_of_each_eval_pair_as_trl_gives_them(tmp_path):
    seen = []

    def metrics(pred):
        seen.append(pred)
        return {"my_metric": 0.125}

    evals = rows(6, start=100)
    t = RewardTrainer("builtin:tiny", args=config(tmp_path, per_device_eval_batch_size=4), train_dataset=rows(),
                      eval_dataset=evals, compute_metrics=metrics)
    out = t.evaluate()
    assert out["eval_my_metric"] == 0.125 and "eval_accuracy" in out
    predictions, labels = seen[0].predictions, seen[0].label_ids
    assert labels == ()  # TRL's RewardTrainer has no label names
    # batches of 4 then 2 pairs: each batch's chosen scores, then its rejected scores
    assert predictions.shape == (12, 1)
    tok, model = t.processing_class, t.model.eval()
    scored = []
    for start, n in ((0, 4), (4, 2)):
        batch = [evals[i] for i in range(start, start + n)]
        texts = [r["prompt"] + r[side] + tok.eos_token for side in ("chosen", "rejected") for r in batch]
        ids = [tok(x)["input_ids"] for x in texts]
        for row in ids:
            with torch.no_grad():
                scored.append(model(input_ids=torch.tensor([row])).logits[0, 0].item())
    np.testing.assert_allclose(predictions[:, 0], scored, rtol=1e-4, atol=1e-5)
    accuracy = np.mean([predictions[i, 0] > predictions[i + 4, 0] for i in range(4)]
                       + [predictions[8 + i, 0] > predictions[10 + i, 0] for i in range(2)])
    assert accuracy == pytest.approx(out["eval_accuracy"])


def test_a_classifier_with_two_labels_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "lm"
    tiny_model(seed=1).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)  # a causal LM's config: 2 labels by default
    assert model.config.num_labels == 2
    with pytest.raises(ValueError, match=r"reward models require `num_labels=1`"):
        RewardTrainer(model, args=config(tmp_path), train_dataset=rows())
    assert not (tmp_path / "out").exists()


def test_a_pretokenized_row_with_one_side_or_bad_ids_is_refused(tmp_path):
    import datasets

    for row, message in (({"chosen_ids": [1, 2]}, "needs both 'chosen_ids' and 'rejected_ids'"),
                         ({"chosen_ids": [1, 2], "rejected_ids": []}, "'rejected_ids' must be a non-empty list")):
        t = RewardTrainer("builtin:tiny", args=config(tmp_path), train_dataset=datasets.Dataset.from_list([row] * 4))
        with pytest.raises(ValueError, match=message):
            t.train()
