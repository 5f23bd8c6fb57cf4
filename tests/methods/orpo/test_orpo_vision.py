"""Issue 25, item 1 (ORPO row): ORPO reads preference rows with images as DPO does (the prompt with its images
through the processor, each answer after it), the pixel values reach the forward of both of a pair's rows, the
chosen/rejected log-probs equal a direct forward of each row with its image, and the chunked head gives the plain
head's loss."""

import math

import pytest
import torch
from PIL import Image

import alignkit
from alignkit_orpo import ORPOLoss
from helpers import fast, read_jsonl, record_forwards

VLM = "builtin:tiny-vlm"


def setup(**method):
    cfg, m = alignkit.load_config("orpo", {"model": {"name_or_path": VLM}, "method": method})
    tokenizer = alignkit.load_tokenizer(cfg.model)
    return cfg, m, tokenizer


def row(colour, chosen, rejected):
    return {"images": [Image.new("RGB", (24, 24), colour)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}


def test_a_preference_row_with_an_image_is_bos_the_prompt_through_the_processor_then_each_answer_and_eos():
    cfg, method, tokenizer = setup()
    formatter = method.formatter(cfg.method, tokenizer)
    assert formatter.reads_images
    example = row((255, 0, 0), "red", "blue")
    features = formatter.format(example).features
    processor = tokenizer.processor
    prompt = processor(images=[example["images"]], text=["<|user|>\n<image>colour?<|end|>\n<|assistant|>\n"],
                       add_special_tokens=False, return_tensors="pt")
    p = [tokenizer.bos_token_id] + prompt["input_ids"][0].tolist()
    assert features["prompt_input_ids"] == p
    for side, word in (("chosen", "red"), ("rejected", "blue")):
        answer = tokenizer(f"{word}<|end|>\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert features[f"{side}_input_ids"] == p + answer
        assert features[f"{side}_labels"] == [-100] * len(p) + answer
    torch.testing.assert_close(torch.tensor(features["pixel_values"]), prompt["pixel_values"][0])


def test_a_text_only_model_refuses_a_row_with_images():
    cfg, method = alignkit.load_config("orpo", {})
    formatter = method.formatter(cfg.method, alignkit.load_tokenizer(cfg.model))
    with pytest.raises(alignkit.DataError, match="text-only"):
        formatter.format(row((255, 0, 0), "red", "blue"))


def batch_and_model(**method):
    cfg, m, tokenizer = setup(**method)
    formatter = m.formatter(cfg.method, tokenizer)
    rows = [formatter.format(row((255, 0, 0), "red", "blue")).features,
            formatter.format(row((0, 0, 255), "blue", "a red one")).features]
    model = alignkit.load_model(cfg.model, tokenizer, seed=0)
    return cfg, formatter.collate(rows), model


def direct_mean_logps(model, batch) -> torch.Tensor:
    """Each row alone, unpadded, with its own image: the mean log-prob of its answer tokens."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][real][None], batch["labels"][i][real][None]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=batch["pixel_values"][i:i + 1],
                           pixel_attention_mask=batch["pixel_attention_mask"][i:i + 1]).logits.float()
        logps = logits[:, :-1].log_softmax(-1)
        targets = labels[:, 1:]
        mask = targets != -100
        out.append(logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask].mean())
    return torch.stack(out)


@pytest.mark.parametrize("implementation", ["chunked", "plain"])
def test_the_log_probs_equal_each_row_forwarded_alone_with_its_image(implementation):
    cfg, batch, model = batch_and_model(loss_implementation=implementation)
    assert batch["pixel_values"].shape[0] == 4  # each pair's image for its chosen and its rejected row
    torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][2])
    loss = ORPOLoss(cfg.method)
    loss.prepare_model(model)
    assert (loss.head is not None) == (implementation == "chunked")
    with torch.no_grad():
        f = loss.forward(model, batch)
    expected = direct_mean_logps(model, batch)
    torch.testing.assert_close(torch.cat([f.chosen_logps, f.rejected_logps]).float(), expected, atol=1e-5, rtol=1e-5)
    # the images matter: each row with another pair's image scores otherwise
    swapped = {**batch, "pixel_values": batch["pixel_values"].roll(1, 0)}
    with torch.no_grad():
        assert not torch.allclose(loss.forward(model, swapped).chosen_logps, f.chosen_logps)


def test_the_chunked_fused_head_gives_the_plain_heads_loss_and_gradients_with_images():
    results = {}
    for implementation in ("chunked", "plain"):
        cfg, batch, model = batch_and_model(loss_implementation=implementation)
        loss = ORPOLoss(cfg.method)
        loss.prepare_model(model)
        out = loss(model, batch)
        total = out.terms["nll_tokens"] / loss.counts(batch)["nll_tokens"] + out.terms["pairs"] / 2
        total.backward()
        grad = model.get_output_embeddings().weight.grad.clone()
        results[implementation] = (total.detach(), grad)
    torch.testing.assert_close(results["chunked"][0], results["plain"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["chunked"][1], results["plain"][1], atol=1e-5, rtol=1e-4)


def test_orpo_trains_on_shapes_pairs_with_the_pixel_values_in_every_forward(tmp_path):
    cfg, _, tokenizer = setup()
    model = alignkit.load_model(cfg.model, tokenizer, seed=0)
    seen = record_forwards(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = fast(tmp_path, max_steps=2, learning_rate=1e-3, per_device_train_batch_size=2)
    config["data"] = {"train": "builtin:shapes-pairs", "max_train_samples": 4, "max_eval_samples": 4}
    config["model"] = {"name_or_path": VLM}
    result = alignkit.run("orpo", config, model=model, tokenizer=tokenizer)
    losses = [r["loss"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert result.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    train_calls = seen[:2]
    assert len(seen) >= 2 and all(p is not None and p.shape[0] == rows == 4 for rows, p in train_calls)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("text_model" in n for n in changed) and any("connector" in n for n in changed)


def test_generate_during_eval_samples_each_prompt_with_its_images(tmp_path):
    cfg, _, tokenizer = setup()
    model = alignkit.load_model(cfg.model, tokenizer, seed=0)
    calls = []
    generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    model.generate = spy
    config = fast(tmp_path, max_steps=1, per_device_train_batch_size=2, eval_on_start=True)
    config["data"] = {"train": "builtin:shapes-pairs", "max_train_samples": 2, "max_eval_samples": 2}
    config["model"] = {"name_or_path": VLM}
    config["method"] = {"generate_during_eval": True, "max_length": 48, "max_prompt_length": 40}  # short samples
    result = alignkit.run("orpo", config, model=model, tokenizer=tokenizer)
    assert calls and all(c["pixel_values"].shape[0] == c["input_ids"].shape[0] == 2 for c in calls)
    rows = read_jsonl(result.output_dir / "completions.jsonl")
    assert len(rows) == 2 * len(calls) and all(isinstance(r["completion"], str) for r in rows)
