"""Issue 25: `alignkit generate` and `alignkit chat` with images (`--image PATH`, repeatable) for a vision-language
model folder: the prompt's user turn gets the image parts, the processor expands them and its pixel values reach
generation; --image for a text-only model, a missing file or one that does not decode is one line, exit 2."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import alignkit
import alignkit.cli.generate as gen
from alignkit.api import load_config
from alignkit.cli.commands import cli
from alignkit.config import ModelConfig, to_yaml
from alignkit.engine.vision import save_processing
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import refused

VLM = "builtin:tiny-vlm"


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A saved tiny VLM as an SFT run on conversations leaves it (weights, processor, config.yaml)."""
    path = tmp_path_factory.mktemp("vlm")
    cfg = ModelConfig(name_or_path=VLM)
    tokenizer = alignkit.load_tokenizer(cfg)
    alignkit.load_model(cfg, tokenizer, seed=0).save_pretrained(path)
    save_processing(tokenizer, path)
    run, _ = load_config("sft", None, {"model.name_or_path": VLM, "data.train": "builtin:shapes-sft"})
    (path / "config.yaml").write_text(to_yaml(run))
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    path = tmp_path_factory.mktemp("pics")
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (24, 24), colour).save(path / f"{name}.png")
    (path / "broken.png").write_bytes(b"not a picture at all")
    return path


def captured(monkeypatch, *args, stdin=None) -> list[tuple[list[int], dict]]:
    """(prompt ids, image inputs) of every generation `alignkit ARGS` starts."""
    seen = []

    def capture(model, tokenizer, input_ids, sampling, emit, images=None):
        seen.append((input_ids[0].tolist(), images or {}))
        return "red"

    monkeypatch.setattr(gen, "stream", capture)
    result = CliRunner().invoke(cli, list(map(str, args)), input=stdin)
    assert result.exit_code == 0, (result.output, result.exception)
    return seen


def expected(folder, pictures, colours, messages):
    tokenizer = alignkit.load_tokenizer(ModelConfig(name_or_path=str(folder)))
    images = [Image.open(pictures / f"{c}.png").convert("RGB") for c in colours]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = tokenizer.processor(images=[images], text=[text], add_special_tokens=False, return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"], tokenizer.processor.image_token_id


def test_generate_puts_the_images_in_the_user_turn_and_their_pixel_values_in_generation(monkeypatch, vlm_folder,
                                                                                            pictures):
    (ids, images), = captured(monkeypatch, "generate", "--model", vlm_folder, "--image", pictures / "red.png",
                              "--image", pictures / "blue.png", "which colours?")
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "which colours?"}]
    want, pixels, image_id = expected(vlm_folder, pictures, ["red", "blue"], [{"role": "user", "content": parts}])
    assert ids == want and ids.count(image_id) == 8  # 4 image tokens per picture
    torch.testing.assert_close(images["pixel_values"], pixels)


def test_generate_with_an_image_runs_the_model_end_to_end(vlm_folder, pictures):
    result = CliRunner().invoke(cli, ["generate", "--model", str(vlm_folder), "--image", str(pictures / "red.png"),
                                      "--temperature", "0", "--max-new-tokens", "3", "colour?"])
    assert result.exit_code == 0, (result.output, result.exception)


def test_raw_generate_puts_the_image_tokens_first_unless_the_text_holds_them(monkeypatch, vlm_folder, pictures):
    tokenizer = alignkit.load_tokenizer(ModelConfig(name_or_path=str(vlm_folder)))
    image = Image.open(pictures / "red.png").convert("RGB")
    want = tokenizer.processor(images=[[image]], text=["<image>colour?"])["input_ids"][0]
    for prompt in ("colour?", "<image>colour?"):
        (ids, images), = captured(monkeypatch, "generate", "--model", vlm_folder, "--raw", "--image",
                                  pictures / "red.png", prompt)
        assert ids == list(want) and images["pixel_values"].shape[:2] == (1, 1)


def test_chat_keeps_the_images_in_the_first_user_turn_through_the_conversation(monkeypatch, vlm_folder, pictures):
    turns = captured(monkeypatch, "chat", "--model", vlm_folder, "--image", pictures / "red.png",
                     stdin="colour?\nsure?\n/exit\n")
    assert len(turns) == 2
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    want, pixels, image_id = expected(vlm_folder, pictures, ["red"], first)
    assert turns[0][0] == want
    second = first + [{"role": "assistant", "content": "red"}, {"role": "user", "content": "sure?"}]
    assert turns[1][0] == expected(vlm_folder, pictures, ["red"], second)[0]
    for ids, images in turns:
        assert ids.count(image_id) == 4
        torch.testing.assert_close(images["pixel_values"], pixels)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("text")
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_image_mistakes_are_one_line_exit_2(vlm_folder, text_folder, pictures, command):
    prompt = ["colour?"] if command == "generate" else []
    line = refused(command, "--model", text_folder, "--image", pictures / "red.png", *prompt)
    assert "--image" in line and "text-only" in line and str(text_folder) in line
    missing = pictures / "green.png"
    line = refused(command, "--model", vlm_folder, "--image", missing, *prompt)
    assert f"--image {missing}: no such image file" in line
    line = refused(command, "--model", vlm_folder, "--image", pictures / "broken.png", *prompt)
    assert f"--image {pictures / 'broken.png'}" in line and "not an image Pillow can decode" in line


def test_after_clear_the_images_go_with_the_new_first_turn(monkeypatch, vlm_folder, pictures):
    turns = captured(monkeypatch, "chat", "--model", vlm_folder, "--image", pictures / "blue.png",
                     stdin="colour?\n/clear\nwhat now?\n/exit\n")
    again = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what now?"}]}]
    want, pixels, _ = expected(vlm_folder, pictures, ["blue"], again)
    assert len(turns) == 2 and turns[1][0] == want
    torch.testing.assert_close(turns[1][1]["pixel_values"], pixels)
