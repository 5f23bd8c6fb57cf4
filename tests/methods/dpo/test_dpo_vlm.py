"""Issue 25, item 3: DPO of the built-in tiny vision-language model on builtin:shapes-pairs: each pair's images reach
the policy's and the reference's forward for both its chosen and its rejected row, prefix sharing steps aside for
rows with images (one notice), and configs/dpo-vlm-demo.yaml (after the SFT demo) learns offline to held-out
accuracy >= 0.9."""

import logging

import pytest
import torch
from PIL import Image

import alignkit
from alignkit.engine.data import load_data
from helpers import ROOT, fast

VLM = "builtin:tiny-vlm"


def dpo_formatter():
    cfg, method = alignkit.load_config("dpo", {"model": {"name_or_path": VLM}})
    tokenizer = alignkit.load_tokenizer(cfg.model)
    return method.formatter(cfg.method, tokenizer), tokenizer


def row(colour, chosen, rejected):
    return {"images": [Image.new("RGB", (24, 24), colour)],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]}


def test_a_preference_row_with_an_image_is_the_prompt_through_the_processor_then_each_answer():
    formatter, tokenizer = dpo_formatter()
    processor = tokenizer.processor
    example = row((255, 0, 0), "red", "blue")
    features = formatter.format(example).features
    prompt = processor(images=[example["images"]], text=["<|user|>\n<image>colour?<|end|>\n<|assistant|>\n"],
                       add_special_tokens=False, return_tensors="pt")
    p = prompt["input_ids"][0].tolist()
    for side, word in (("chosen", "red"), ("rejected", "blue")):
        answer = tokenizer(f"{word}<|end|>\n", add_special_tokens=False)["input_ids"]
        assert features[f"{side}_input_ids"] == p + answer
        assert features[f"{side}_labels"] == [-100] * len(p) + answer
    torch.testing.assert_close(torch.tensor(features["pixel_values"]), prompt["pixel_values"][0])
    # a batch of two pairs: [chosen; rejected] rows, each pair's image for both of its rows
    other = formatter.format(row((0, 0, 255), "blue", "red")).features
    batch = formatter.collate([features, other])
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][2])
    torch.testing.assert_close(batch["pixel_values"][1], batch["pixel_values"][3])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


def test_dpo_trains_on_images_with_one_notice_that_prompts_are_not_shared(tmp_path, caplog):
    config = fast(tmp_path, max_steps=2, learning_rate=1e-3, eval_on_start=True)
    config["data"] = {"train": "builtin:shapes-pairs", "max_train_samples": 8, "max_eval_samples": 8}
    config["model"] = {"name_or_path": VLM}
    with caplog.at_level(logging.WARNING):
        result = alignkit.run("dpo", config)
    notices = [r for r in caplog.records if "rows with images run unshared" in r.getMessage()]
    assert len(notices) == 1
    rows = [r for r in (result.output_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in r]
    import json

    first = json.loads(rows[0])  # at step 0 the policy is its reference: every reward is exactly 0
    assert first["step"] == 0 and first["eval_rewards/margins"] == 0 and first["eval_loss"] == pytest.approx(
        torch.nn.functional.softplus(torch.tensor(0.0)).item())
    assert torch.isfinite(torch.tensor(result.metrics["eval_loss"]))


def test_shapes_dpo_pairs_a_right_and_a_wrong_answer_to_one_question():
    ds = load_data("builtin:shapes-pairs", "test")
    for r in ds.select(range(20)):
        chosen, rejected = r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"]
        assert chosen != rejected and len(r["images"]) == 1


@pytest.mark.slow  # the SFT demo, then the DPO demo from its model: about 8 minutes on 2 CPU cores
def test_the_dpo_vlm_demo_learns_to_prefer_the_right_answer(tmp_path):
    quiet = {"train.disable_tqdm": True, "train.plots": False, "train.save_steps": None}
    sft = alignkit.run(None, str(ROOT / "configs" / "sft-vlm-demo.yaml"),
                       **{"train.output_dir": str(tmp_path / "sft"), **quiet})
    result = alignkit.run(None, str(ROOT / "configs" / "dpo-vlm-demo.yaml"),
                          **{"model.name_or_path": str(sft.output_dir), "train.output_dir": str(tmp_path / "dpo"),
                             **quiet})
    assert result.metrics["eval_rewards/accuracies"] >= 0.9
