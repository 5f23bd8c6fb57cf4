"""Issue 25, item 1: the built-in tiny vision-language model `builtin:tiny-vlm` loads offline as an image-text-to-text
model (its processor from the built-in tokenizer plus the image tokens), its vision tower frozen unless
model.freeze_vision_tower=false, LoRA on the language model only, and its saved folder loads with from_pretrained and
AutoProcessor."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import alignkit
from alignkit.config import LoraSettings, ModelConfig
from alignkit.engine.vision import save_processing
from alignkit.errors import ConfigError
from alignkit.testing import tiny_tokenizer

VLM = "builtin:tiny-vlm"


def load(**settings):
    cfg = ModelConfig(name_or_path=VLM, **settings)
    tokenizer = alignkit.load_tokenizer(cfg)
    return cfg, tokenizer, alignkit.load_model(cfg, tokenizer, seed=0)


def red_square():
    return Image.new("RGB", (20, 20), (255, 0, 0))


def test_the_builtin_vlm_is_an_image_text_to_text_model_with_a_processor_that_expands_images():
    _, tokenizer, model = load()
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    processor = tokenizer.processor
    assert len(tokenizer) == len(tiny_tokenizer()) + 4 == model.config.text_config.vocab_size
    out = processor(images=[[red_square()]], text=["<image>which colour?"], return_tensors="pt")
    image_id = processor.image_token_id
    assert int((out["input_ids"] == image_id).sum()) == 4  # 32x32 pixels, 8x8 patches, merged 2x2
    assert tuple(out["pixel_values"].shape) == (1, 1, 3, 32, 32)
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (1, out["input_ids"].shape[1], len(tokenizer))
    # the image reaches the model: another image, other logits at the text positions
    blue = processor(images=[[Image.new("RGB", (20, 20), (0, 0, 255))]], text=["<image>which colour?"],
                     return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**blue).logits[0, -1], logits[0, -1])
    # text-only conversations render exactly as with the built-in tokenizer's template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == \
        tiny_tokenizer().apply_chat_template(messages, tokenize=False)


def test_the_vision_tower_is_frozen_by_default_and_trainable_on_request():
    _, _, model = load()
    vision = {n: p.requires_grad for n, p in model.named_parameters() if ".vision_model." in n}
    rest = {n: p.requires_grad for n, p in model.named_parameters() if ".vision_model." not in n}
    assert vision and not any(vision.values())
    assert rest and all(rest.values())  # the connector and the language model train
    _, _, model = load(freeze_vision_tower=False)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_targets_the_language_model_by_default():
    pytest.importorskip("peft")
    cfg, _, model = load(peft=LoraSettings(r=4, alpha=8))
    model = alignkit.apply_peft(model, cfg.peft)
    adapted = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert adapted and all(".text_model." in n for n in adapted), adapted
    assert any(".self_attn.q_proj." in n for n in adapted) and any(".mlp.down_proj." in n for n in adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable), trainable


def test_a_saved_vlm_folder_loads_with_from_pretrained_and_auto_processor(tmp_path):
    _, tokenizer, model = load()
    model.save_pretrained(tmp_path)
    save_processing(tokenizer, tmp_path)
    assert (tmp_path / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    batch = processor(images=[[red_square()]], text=["<image>which colour?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)
    # alignkit loads the folder back as a vision-language model with its processor
    cfg = ModelConfig(name_or_path=str(tmp_path))
    loaded_tokenizer = alignkit.load_tokenizer(cfg)
    loaded = alignkit.load_model(cfg, loaded_tokenizer, seed=1)
    assert type(loaded).__name__ == "Idefics3ForConditionalGeneration"
    assert loaded_tokenizer.processor.image_token_id == processor.image_token_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_a_vlm_folder_without_its_processor_is_refused_naming_the_folder(tmp_path):
    _, _, model = load()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)  # a tokenizer, but no processor
    with pytest.raises(ConfigError) as e:
        alignkit.load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    message = str(e.value)
    assert message.startswith(f"model.name_or_path: {tmp_path} is a vision-language model") and "\n" not in message
    assert "processor_config.json" in message
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]  # the folder is untouched
