"""Issue 25, item 1 (KTO row): KTO reads unpaired-preference rows with images (prompt/completion/label + images, or
paired rows unpaired): the prompt with its images through the processor, the completion after it; each KL mismatch
pair (the prompt followed by another row's completion) keeps its prompt's own images, fixed at preprocessing or
rotated in the batch; the pixel values reach every forward, the log-probs equal a direct forward of each row with its
images, and the fused head gives the plain head's loss."""

import math

import pytest
import torch
from alignkit_kto import KTOLoss
from alignkit_kto.pairing import kl_pairs
from PIL import Image

import alignkit
from helpers import fast, read_jsonl, record_forwards

VLM = "builtin:tiny-vlm"
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 160, 0)}


def setup(**method):
    cfg, m = alignkit.load_config("kto", {"model": {"name_or_path": VLM}, "method": method})
    tokenizer = alignkit.load_tokenizer(cfg.model)
    return cfg, m.formatter(cfg.method, tokenizer), tokenizer


def row(colour, answer, label):
    return {"images": [Image.new("RGB", (24, 24), COLOURS[colour])],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], "label": label}


ROWS = [row("red", "red", True), row("blue", "a red one", False), row("green", "green", True)]


def processed(tokenizer, colour):
    return tokenizer.processor(images=[[Image.new("RGB", (24, 24), COLOURS[colour])]],
                               text=["<|user|>\n<image>colour?<|end|>\n<|assistant|>\n"], add_special_tokens=False,
                               return_tensors="pt")


def test_an_unpaired_row_with_an_image_is_the_prompt_through_the_processor_then_the_completion():
    _, formatter, tokenizer = setup()
    assert formatter.reads_images
    examples = [e for r in formatter.format_batch(ROWS) for e in r]
    answers = ["red", "a red one", "green"]
    prompts = [processed(tokenizer, c) for c in ("red", "blue", "green")]
    for i, e in enumerate(examples):
        f = e.features
        p = prompts[i]["input_ids"][0].tolist()
        answer = tokenizer(f"{answers[i]}<|end|>\n", add_special_tokens=False)["input_ids"]
        assert f["prompt_input_ids"] == p and f["completion_input_ids"] == p + answer
        assert f["completion_labels"] == [-100] * len(p) + answer
        # the KL pair: this prompt (with its own image tokens) and the previous example's completion
        other = tokenizer(f"{answers[i - 1]}<|end|>\n", add_special_tokens=False)["input_ids"]
        assert f["KL_completion_input_ids"] == p + other
        torch.testing.assert_close(torch.tensor(f["pixel_values"]), prompts[i]["pixel_values"][0])
    batch = formatter.collate([e.features for e in examples])
    for i in range(3):  # one image per row, the row's own, read by its completion row and its KL row alike
        torch.testing.assert_close(batch["pixel_values"][i], prompts[i]["pixel_values"][0])


def test_a_paired_row_with_an_image_gives_both_examples_its_image():
    _, formatter, tokenizer = setup()
    paired = {"images": ROWS[0]["images"], "prompt": ROWS[0]["prompt"], "chosen": ROWS[0]["completion"],
              "rejected": ROWS[1]["completion"]}
    examples = formatter.format(paired)
    assert [e.features["label"] for e in examples] == [True, False]
    for e in examples:
        torch.testing.assert_close(torch.tensor(e.features["pixel_values"]),
                                   processed(tokenizer, "red")["pixel_values"][0])


def test_rows_with_images_are_refused_by_a_text_only_model_and_when_truncation_cuts_their_image_tokens():
    cfg, m = alignkit.load_config("kto", {})
    formatter = m.formatter(cfg.method, alignkit.load_tokenizer(cfg.model))
    with pytest.raises(alignkit.DataError, match="text-only"):
        formatter.format(ROWS[0])
    _, short, _ = setup(max_length=8, truncation_mode="keep_end")
    with pytest.raises(alignkit.DataError, match="image tokens do not fit in method.max_length=8"):
        short.format(ROWS[0])


def loaded(**method):
    cfg, formatter, tokenizer = setup(**method)
    batch = formatter.collate([e.features for r in formatter.format_batch(ROWS) for e in r])
    return cfg, batch, alignkit.load_model(cfg.model, tokenizer, seed=0)


def direct_logps(model, batch, prefix) -> torch.Tensor:
    """Each row alone, unpadded, with its own image: the summed log-prob of its completion tokens."""
    out = []
    for i in range(batch["label"].shape[0]):
        real = batch[f"{prefix}attention_mask"][i].bool()
        ids, labels = batch[f"{prefix}input_ids"][i][real][None], batch[f"{prefix}labels"][i][real][None]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=batch["pixel_values"][i:i + 1],
                           pixel_attention_mask=batch["pixel_attention_mask"][i:i + 1]).logits.float()
        targets = labels[:, 1:]
        logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        out.append(logps[targets != -100].sum())
    return torch.stack(out)


@pytest.mark.parametrize("implementation", ["chunked", "plain"])
@pytest.mark.parametrize("pairing", ["fixed", "batch"])
def test_completion_and_kl_log_probs_equal_each_row_forwarded_alone_with_its_image(implementation, pairing):
    cfg, batch, model = loaded(loss_implementation=implementation, kl_pairing=pairing)
    loss = KTOLoss(cfg.method)
    loss.prepare_model(model)
    with torch.no_grad():
        torch.testing.assert_close(loss.stats(model, batch, "").logps.float(), direct_logps(model, batch, ""),
                                   atol=1e-4, rtol=1e-5)
        pairs = kl_pairs(batch, cfg.method)
        kl = loss.stats(model, pairs, "KL_").logps.float()
        torch.testing.assert_close(kl, direct_logps(model, {**batch, **pairs}, "KL_"), atol=1e-4, rtol=1e-5)
        # each KL pair reads its prompt's own image: another pair's image scores otherwise
        swapped = {**pairs, "pixel_values": batch["pixel_values"].roll(1, 0),
                   "pixel_attention_mask": batch["pixel_attention_mask"]}
        assert not torch.allclose(loss.stats(model, swapped, "KL_").logps.float(), kl)


def test_the_fused_head_gives_the_plain_heads_loss_and_gradients_with_images():
    results = {}
    for implementation in ("chunked", "plain"):
        cfg, batch, model = loaded(loss_implementation=implementation)
        loss = KTOLoss(cfg.method)
        loss.prepare_model(model)
        with torch.no_grad():
            ref = loss.reference(alignkit.load_model(cfg.model, alignkit.load_tokenizer(cfg.model), seed=1), batch)
        out = loss(model, batch, ref)
        out.terms["examples"].backward()
        results[implementation] = (out.terms["examples"].detach(), model.get_output_embeddings().weight.grad.clone())
    torch.testing.assert_close(results["chunked"][0], results["plain"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["chunked"][1], results["plain"][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("precompute", [False, True])
def test_kto_trains_on_shapes_pairs_unpaired_with_the_pixel_values_in_every_forward(tmp_path, precompute):
    cfg, _, tokenizer = setup()
    model = alignkit.load_model(cfg.model, tokenizer, seed=0)
    seen = record_forwards(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = fast(tmp_path, max_steps=2, learning_rate=1e-3, per_device_train_batch_size=2)
    config["data"] = {"train": "builtin:shapes-pairs", "max_train_samples": 4, "max_eval_samples": 4}
    config["model"] = {"name_or_path": VLM}
    config["method"] = {"precompute_ref_log_probs": precompute}
    result = alignkit.run("kto", config, model=model, tokenizer=tokenizer)
    losses = [r["loss"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert result.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert len(seen) >= 4 and all(p is not None and p.shape[0] == rows for rows, p in seen)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("text_model" in n for n in changed) and any("connector" in n for n in changed)


def test_one_step_equals_trl_ktotrainer_on_the_tiny_vlm(tmp_path):
    """TRL 1.16's KTOTrainer takes the tiny VLM with unpaired rows with images (its vision collator): one training
    step on the same model, reference, processor and rows gives the same loss and gradients (every parameter: the
    vision tower trains)."""
    import json
    import sys

    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import KTOConfig, KTOTrainer

    from alignkit.engine.loop import Engine
    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_vlm_with_trl as bench

    n = 4
    bench.make_inputs(tmp_path, n)
    pairs = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    rows = [{"images": r["images"], "prompt": r["prompt"], "completion": r["chosen" if i % 2 == 0 else "rejected"],
             "label": i % 2 == 0} for i, r in enumerate(pairs)]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "kto.jsonl"), split="train")
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, report_to=[], use_cpu=True,
                     bf16=False, remove_unused_columns=False)
    trainer = KTOTrainer(model=AutoModelForImageTextToText.from_pretrained(tmp_path / "model"),
                         ref_model=AutoModelForImageTextToText.from_pretrained(tmp_path / "ref"), args=args,
                         processing_class=AutoProcessor.from_pretrained(tmp_path / "model"), train_dataset=ds)
    theirs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, theirs)
    trl_loss.backward()
    trl_grads = {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}

    cfg, method = alignkit.load_config("kto", None, {
        "model.name_or_path": str(tmp_path / "model"), "model.ref_name_or_path": str(tmp_path / "ref"),
        "model.freeze_vision_tower": False, "data.train": str(tmp_path / "kto.jsonl"),
        "train.per_device_train_batch_size": n, "method.kl_group_size": n, "train.output_dir": str(tmp_path / "ak")})
    engine = Engine(cfg, method, alignkit.get_plugin_manager()).load()
    formatted = engine.data.formatted(need_train=True)["train"]
    batch = engine.formatter.collate([formatted[i] for i in range(len(formatted))])
    for ours, key in (("input_ids", "input_ids"), ("KL_input_ids", "KL_input_ids"), ("pixel_values", "pixel_values")):
        torch.testing.assert_close(batch[ours], theirs[key])  # the same ids and images (both right-padded)
    engine.model.train()
    out = engine.loss(engine.model, batch, ref=engine.reference(engine.model, dict(batch)))
    loss = out.normalized({u: float(c) for u, c in engine.loss.counts(batch).items()})
    loss.backward()
    grads = {k: p.grad for k, p in engine.model.named_parameters() if p.grad is not None}
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * abs(trl_loss.item())
    assert set(grads) == set(trl_grads) and any(".vision_model." in k for k in grads)
    assert bench.gradient_difference(grads, trl_grads) <= 1e-5


def test_a_kl_pair_whose_cut_would_drop_its_prompts_image_tokens_is_refused():
    """Each example fits max_length, but example 0's KL pair (its long prompt, example 1's long completion) does not:
    keep_end would cut its image tokens, so the images could not follow the prompt."""
    long_prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which colour is it?"}]}]
    rows = [{**row("red", "red", True), "prompt": long_prompt}, row("blue", "a rather red one", False)]
    _, formatter, _ = setup()
    (first,), (second,) = formatter.format_batch(rows)
    own = [len(e.features["completion_input_ids"]) for e in (first, second)]
    assert len(first.features["KL_completion_input_ids"]) > max(own)
    _, short, _ = setup(max_length=max(own), truncation_mode="keep_end")
    with pytest.raises(alignkit.DataError, match="image tokens do not fit in method.max_length"):
        short.format_batch(rows)
