"""Issue 25, item 3: SFT of the built-in tiny vision-language model on builtin:shapes-sft (pictures of coloured shapes
drawn at run time); the shipped demo configs/sft-vlm-demo.yaml learns offline to held-out token accuracy >= 0.9."""

import pytest
from PIL import Image

import alignkit
from alignkit.blocks.shapes import COLOURS, QUESTIONS
from alignkit.engine.data import load_data
from helpers import ROOT, fast


def test_shapes_sft_rows_are_pictures_with_questions_whose_answers_they_show():
    train, test = load_data("builtin:shapes-sft", "train"), load_data("builtin:shapes-sft", "test")
    assert (len(train), len(test)) == (1500, 200)
    for row in test.select(range(40)):
        (image,) = row["images"]
        assert isinstance(image, Image.Image) and image.size == (32, 32)
        question = row["prompt"][0]["content"][1]["text"]
        answer = row["completion"][0]["content"][0]["text"]
        pixels = [p for p in image.convert("RGB").getdata() if p != (255, 255, 255)]
        if question == QUESTIONS["colour"]:
            assert max(set(pixels), key=pixels.count) == COLOURS[answer]
        elif question == QUESTIONS["count"]:
            # the shapes sit one per 16x16 quadrant: the quadrants with coloured pixels count them
            quadrants = {(x // 16, y // 16) for x in range(32) for y in range(32)
                         if image.getpixel((x, y)) != (255, 255, 255)}
            assert len(quadrants) == int(answer)
        else:
            assert answer in ("circle", "square", "triangle")
    first = {bytes(r["images"][0].tobytes()) for r in train.select(range(200))}
    assert len(first & {bytes(r["images"][0].tobytes()) for r in test}) < 20  # separate random streams


def test_sft_with_lora_on_images_saves_an_adapter_with_the_processor_that_evaluates_back(tmp_path):
    config = fast(tmp_path, max_steps=3, learning_rate=1e-3)
    config["data"] = {"train": "builtin:shapes-sft", "max_train_samples": 12, "max_eval_samples": 8}
    config["model"] = {"name_or_path": "builtin:tiny-vlm", "peft": {"r": 4, "alpha": 8}}
    result = alignkit.run("sft", config)
    out = result.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "processor_config.json").is_file()
    card = (out / "README.md").read_text()  # the model card names the kind the folder loads as
    assert "pipeline_tag: image-text-to-text" in card and "loads with `AutoModelForImageTextToText" in card
    again = alignkit.evaluate(None, **{"model.name_or_path": str(out), "train.output_dir": str(tmp_path / "eval")})
    assert again["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)


@pytest.mark.slow  # about 2.5 minutes on 2 CPU cores
def test_the_sft_vlm_demo_learns_to_answer_questions_about_pictures(tmp_path):
    result = alignkit.run(None, str(ROOT / "configs" / "sft-vlm-demo.yaml"),
                          **{"train.output_dir": str(tmp_path / "out"), "train.disable_tqdm": True,
                             "train.plots": False, "train.save_steps": None})
    assert result.metrics["eval_mean_token_accuracy"] >= 0.9
