"""SFTTrainer beyond alignkit's own row shapes, as TRL 1.16's SFTTrainer takes them: pre-tokenized rows (labels
built from their mask columns, or taken as given), datasets TRL refuses with its own message, ..."""

import datasets
import pytest
from alignkit_trl import SFTConfig, SFTTrainer


def trainer(tmp_path, rows, **args):
    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **args)
    return SFTTrainer("builtin:tiny", args=config, train_dataset=rows)


def test_pretokenized_rows_get_labels_from_their_assistant_mask(tmp_path):
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4], "assistant_masks": [0, 0, 1, 1]},
                                       {"input_ids": [5, 6, 7], "assistant_masks": [0, 1, 1]}])
    assert trainer(tmp_path, rows).train_dataset["labels"] == [[-100, -100, 3, 4], [-100, 6, 7]]


def test_pretokenized_rows_keep_their_own_labels(tmp_path):
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [1, -100, 3, -100],
                                        "assistant_masks": [1, 1, 1, 1]}])
    assert trainer(tmp_path, rows).train_dataset["labels"] == [[1, -100, 3, -100]]


def test_pretokenized_completion_mask_applies_only_with_completion_only_loss(tmp_path):
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]}])
    assert trainer(tmp_path / "a", rows).train_dataset["labels"] == [[1, 2, 3, 4]]
    masked = trainer(tmp_path / "b", rows, completion_only_loss=True).train_dataset["labels"]
    assert masked == [[-100, -100, 3, 4]]


def test_pretokenized_rows_are_truncated_and_dropped_when_nothing_trained_is_left(tmp_path):
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4, 5], "assistant_masks": [0, 0, 0, 1, 1]},
                                       {"input_ids": [6, 7, 8, 9], "assistant_masks": [1, 1, 1, 1]}])
    assert trainer(tmp_path, rows, max_length=3).train_dataset["labels"] == [[6, 7, 8]]


def test_pretokenized_rows_train(tmp_path):
    rows = datasets.Dataset.from_list([{"input_ids": [5 + i, 6, 7, 8 + i]} for i in range(8)])
    t = trainer(tmp_path, rows, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3)
    before = {n: p.clone() for n, p in t.model.named_parameters()}
    t.train()
    assert t.state.global_step == 2
    assert any(not p.equal(t.model.get_parameter(n)) for n, p in before.items())


def test_a_with_transform_dataset_is_refused_with_trls_message(tmp_path):
    rows = datasets.Dataset.from_dict({"text": ["hello world"]}).with_transform(lambda batch: batch)
    with pytest.raises(ValueError, match=r"Dataset\.with_transform\(\).*skip_prepare_dataset.*trainer-ready"):
        trainer(tmp_path, rows)


def test_skip_prepare_dataset_takes_trainer_ready_rows_and_refuses_masks_without_labels(tmp_path):
    ready = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]}] * 2)
    t = trainer(tmp_path / "a", ready, max_length=3, dataset_kwargs={"skip_prepare_dataset": True})
    assert t.train_dataset["labels"] == [[-100, 2, 3, 4, 5]] * 2  # TRL: no truncation when preparation is skipped
    masks = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4], "assistant_masks": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="mask columns but no 'labels'.*Add a 'labels' column"):
        trainer(tmp_path / "b", masks, dataset_kwargs={"skip_prepare_dataset": True})
    with pytest.raises(ValueError, match="skip_prepare_dataset.*input_ids"):
        trainer(tmp_path / "c", datasets.Dataset.from_dict({"text": ["hi"]}),
                dataset_kwargs={"skip_prepare_dataset": True})
    assert not (tmp_path / "b" / "out").exists() and not (tmp_path / "c" / "out").exists()


def test_padding_free_without_packing_needs_max_length_none_as_trl(tmp_path):
    rows = datasets.Dataset.from_dict({"text": ["one two three", "four five"]})
    with pytest.raises(ValueError, match="`max_length` is not enforced"):
        trainer(tmp_path / "a", rows, max_length=16, padding_free=True)
    t = trainer(tmp_path / "b", rows, max_length=16, padding_free=True, packing=True)
    assert "position_ids" in t.train_dataset.column_names


def test_packed_rows_carry_seq_lengths_and_eval_packing_false_leaves_eval_rows_unpacked(tmp_path):
    rows = datasets.Dataset.from_dict({"text": ["one two three four", "five six", "seven eight nine"]})
    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", packing=True, max_length=64,
                       eval_packing=False)
    t = SFTTrainer("builtin:tiny", args=config, train_dataset=rows, eval_dataset=rows)
    assert len(t.train_dataset) == 1
    (lengths,) = t.train_dataset["seq_lengths"]
    assert sorted(lengths) == sorted(len(ids) for ids in t.eval_dataset["input_ids"])
    assert len(t.eval_dataset) == 3 and "seq_lengths" not in t.eval_dataset.column_names
    assert t.evaluate()["eval_loss"] > 0


def test_several_named_eval_sets_are_each_evaluated_during_training_after_the_log_row(tmp_path):
    rows = datasets.Dataset.from_dict({"text": [f"{w} one two three" for w in "abcdefgh"]})
    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2,
                       per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2, logging_steps=2)
    t = SFTTrainer("builtin:tiny", args=config, train_dataset=rows,
                   eval_dataset={"a": rows.select(range(2)), "b": rows.select(range(2, 6))})
    assert {k: len(v) for k, v in t.eval_dataset.items()} == {"a": 2, "b": 4}
    assert "input_ids" in t.eval_dataset["a"].column_names
    t.train()
    rows_at_2 = [r for r in t.state.log_history if r["step"] == 2]
    assert ["loss" in rows_at_2[0], "eval_a_loss" in rows_at_2[1], "eval_b_loss" in rows_at_2[2]] == [True] * 3
    assert not any("eval_loss" in r for r in t.state.log_history)
    assert rows_at_2[1]["eval_a_loss"] != rows_at_2[2]["eval_b_loss"]


def test_compute_metrics_gets_the_logits_and_labels_at_every_evaluation(tmp_path):
    rows = datasets.Dataset.from_dict({"text": [f"{w} one two three" for w in "abcdefgh"]})
    seen = []

    def compute_metrics(pred):
        seen.append((pred.predictions.shape, pred.label_ids.shape))
        return {"labelled": float((pred.label_ids != -100).sum())}

    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2,
                       per_device_train_batch_size=4, per_device_eval_batch_size=2, eval_strategy="steps",
                       eval_steps=1)
    t = SFTTrainer("builtin:tiny", args=config, train_dataset=rows, eval_dataset=rows.select(range(3)),
                   compute_metrics=compute_metrics)
    t.train()
    evals = [r for r in t.state.log_history if "eval_loss" in r]
    labelled = sum(len(ids) for ids in t.eval_dataset["input_ids"])  # every token of a text row is a label
    assert [r["eval_labelled"] for r in evals] == [labelled, labelled]
    width = max(len(ids) for ids in t.eval_dataset["input_ids"])
    assert seen[0] == ((3, width, t.model.config.vocab_size), (3, width))
    t.preprocess_logits_for_metrics = lambda logits, labels: logits.argmax(-1)
    assert t.evaluate()["eval_labelled"] == labelled and seen[-1][0] == (3, width)


def test_from_value_conversations_are_read_as_chatml_messages(tmp_path):
    chat = [{"role": "user", "content": "sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    sharegpt = [{"from": m["role"], "value": m["content"]} for m in chat]
    t = trainer(tmp_path / "a", datasets.Dataset.from_list([{"conversations": sharegpt}] * 2))
    expected = trainer(tmp_path / "b", datasets.Dataset.from_list([{"messages": chat}] * 2)).train_dataset
    assert t.train_dataset["input_ids"] == expected["input_ids"] and t.train_dataset["labels"] == expected["labels"]


@pytest.mark.parametrize("kind", ["prompt_tuning", "prompt_encoder"])
def test_peft_prompt_learning_trains_its_virtual_tokens_only(tmp_path, kind):
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType

    peft = (PromptTuningConfig if kind == "prompt_tuning" else PromptEncoderConfig)(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    rows = datasets.Dataset.from_dict({"text": [f"{w} one two three" for w in "abcdefgh"]})
    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2,
                       per_device_train_batch_size=4, learning_rate=1e-2)
    t = SFTTrainer("builtin:tiny", args=config, train_dataset=rows, peft_config=peft)
    before = {n: p.clone() for n, p in t.model.named_parameters()}
    t.train()
    changed = {n for n, p in before.items() if not p.equal(t.model.get_parameter(n))}
    assert changed and all("prompt_encoder" in n for n in changed)
    assert t.state.log_history[-1]["mean_token_accuracy"] is not None


def test_dft_loss_is_the_token_nll_weighted_by_the_detached_token_probability(tmp_path):
    import torch

    rows = datasets.Dataset.from_dict({"text": ["one two three four", "five six"]})
    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", loss_type="dft",
                       per_device_eval_batch_size=2)
    t = SFTTrainer("builtin:tiny", args=config, train_dataset=rows, eval_dataset=rows)
    batch = t.data_collator([t.eval_dataset[i] for i in range(2)])
    with torch.no_grad():
        logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None].clamp(min=0))[..., 0]
    mask = batch["labels"][:, 1:] != -100
    expected = (-(logps * logps.exp())[mask]).sum() / mask.sum()
    assert t.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-3)  # (bf16 autocast)
    assert expected.item() != pytest.approx((-logps[mask]).mean().item(), rel=1e-2)  # not the NLL


def test_wrapped_packing_concatenates_the_examples_and_cuts_every_max_length_tokens(tmp_path):
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7]}, {"input_ids": [8, 9]}])
    t = trainer(tmp_path, rows, packing=True, packing_strategy="wrapped", max_length=4)
    assert t.train_dataset["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert t.train_dataset["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 3], [0]]
    bfd = trainer(tmp_path / "b", rows, packing=True, max_length=4).train_dataset["input_ids"]
    assert sorted(bfd) == [[1, 2, 3], [4, 5, 6, 7], [8, 9]]  # bfd keeps each example whole


def test_rows_with_images_for_a_text_model_are_refused_with_trls_message_before_anything_is_written(tmp_path):
    from PIL import Image

    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "what is it?"},
                                                     {"role": "assistant", "content": "blue"}],
                                        "images": [Image.new("RGB", (8, 8), (0, 0, 255))]}])
    with pytest.raises(ValueError, match="vision-related.*vision-language model"):
        trainer(tmp_path, rows)
    assert not (tmp_path / "out").exists()
