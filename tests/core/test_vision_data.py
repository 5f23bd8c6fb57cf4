"""Issue 25, item 2: TRL's multimodal rows (an `images` column of PIL images, paths relative to the data file or
datasets.Image values; conversational content with image and text parts) through the model's processor: the image
tokens expanded, the image features in the batch and in the model's forward; bad image data refused in one line."""

import datasets
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import alignkit
from alignkit.cli.commands import cli
from alignkit.config import ModelConfig
from alignkit.errors import DataError
from alignkit.formatters import SequenceFormatter
from alignkit.formatters.config import SequenceDataConfig
from alignkit.formatters.packing import model_inputs
from helpers import read_jsonl, refused, write_jsonl

VLM = "builtin:tiny-vlm"
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def vlm_tokenizer():
    return alignkit.load_tokenizer(ModelConfig(name_or_path=VLM))


def question(parts=True):
    text = "which colour?"
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}] if parts else text}]


def answer(colour):
    return [{"role": "assistant", "content": [{"type": "text", "text": colour}]}]


def write_images(folder, names=COLOURS):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (24, 24), COLOURS[name]).save(folder / f"{name}.png")


def image_rows(colours=("red", "blue", "red", "blue")):
    return [{"images": [f"pics/{c}.png"], "prompt": question(), "completion": answer(c)} for c in colours]


def test_a_prompt_completion_row_with_an_image_is_the_processors_rendering_with_the_prompt_masked():
    tokenizer = vlm_tokenizer()
    processor = tokenizer.processor
    formatter = SequenceFormatter(SequenceDataConfig(name="sft"), tokenizer)
    red = Image.new("RGB", (24, 24), COLOURS["red"])
    features = formatter.format({"images": [red], "prompt": question(), "completion": answer("red")}).features
    # expected: the processor on the rendered prompt, then the completion's text
    prompt_text = "<|user|>\n<image>which colour?<|end|>\n<|assistant|>\n"
    expected = processor(images=[[red]], text=[prompt_text], add_special_tokens=False, return_tensors="pt")
    completion_ids = tokenizer("red<|end|>\n", add_special_tokens=False)["input_ids"]
    n_prompt = expected["input_ids"].shape[1]
    assert features["input_ids"] == expected["input_ids"][0].tolist() + completion_ids
    assert features["labels"] == [-100] * n_prompt + completion_ids
    assert features["input_ids"].count(processor.image_token_id) == 4
    torch.testing.assert_close(torch.tensor(features["pixel_values"]), expected["pixel_values"][0])
    # all-string conversations get their image before the first user turn's text (TRL's rule): the same ids
    plain = formatter.format({"images": [red], "prompt": question(parts=False), "completion": answer("red")})
    assert plain.features["input_ids"] == features["input_ids"]


def test_a_batch_carries_the_pixel_values_to_the_models_forward(tmp_path):
    tokenizer = vlm_tokenizer()
    formatter = SequenceFormatter(SequenceDataConfig(name="sft"), tokenizer)
    rows = [{"images": [Image.new("RGB", (24, 24), COLOURS[c])], "prompt": question(), "completion": answer(c)}
            for c in ("red", "blue")]
    text_row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant",
                                                                                "content": "yo"}]}
    batch = formatter.collate([formatter.format(r).features for r in rows + [text_row]])
    assert tuple(batch["pixel_values"].shape) == (3, 1, 3, 32, 32)
    assert batch["pixel_values"][2].abs().sum() == 0  # the text row: a zero (padding) image the model skips
    inputs = model_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
    model = alignkit.load_model(ModelConfig(name_or_path=VLM), tokenizer, seed=0)
    with torch.no_grad():
        logits = model(**inputs).logits
        swapped = model(**{**inputs, "pixel_values": inputs["pixel_values"][[1, 0, 2]]}).logits
    n = len(formatter.format(rows[0]).features["input_ids"])
    assert not torch.allclose(logits[0, :n], swapped[0, :n])  # the images reach the model
    torch.testing.assert_close(logits[2], swapped[2])  # the text row is untouched


def test_sft_trains_on_a_jsonl_file_with_image_paths_relative_to_it(tmp_path):
    write_images(tmp_path / "pics")
    data = write_jsonl(tmp_path / "train.jsonl", image_rows())
    args = ["-q", "run", "-m", "sft", f"data.train={data}", f"data.eval={data}", f"model.name_or_path={VLM}",
            f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2", "train.per_device_train_batch_size=2",
            "train.save_steps=null", "train.plots=false", "train.disable_tqdm=true", "train.eval_on_start=false",
            "train.eval_steps=null", "train.learning_rate=1e-3", "train.logging_steps=1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "out" / "processor_config.json").is_file()
    # the images decide the numbers: the same rows with the colours' images swapped evaluate differently
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "pics").mkdir()
    for a, b in (("red", "blue"), ("blue", "red")):
        Image.new("RGB", (24, 24), COLOURS[b]).save(swapped / "pics" / f"{a}.png")
    other = write_jsonl(swapped / "train.jsonl", image_rows())
    out = tmp_path / "out"
    first = alignkit.evaluate("sft", **{"model.name_or_path": str(out), "data.eval": data,
                                        "train.output_dir": str(tmp_path / "e1")})
    second = alignkit.evaluate("sft", **{"model.name_or_path": str(out), "data.eval": other,
                                         "train.output_dir": str(tmp_path / "e2")})
    assert first["eval_loss"] != pytest.approx(second["eval_loss"], rel=1e-6)


def test_datasets_image_values_are_read(tmp_path):
    images = [Image.new("RGB", (24, 24), COLOURS[c]) for c in ("red", "blue")]
    ds = datasets.Dataset.from_dict({"images": [[images[0]], [images[1]]], "prompt": [question()] * 2,
                                     "completion": [answer("red"), answer("blue")]})
    assert isinstance(ds.features["images"].feature, datasets.Image)
    formatter = SequenceFormatter(SequenceDataConfig(name="sft"), vlm_tokenizer())
    undecoded = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    a = formatter.format(ds[0]).features
    b = formatter.format(undecoded[0]).features
    assert a["pixel_values"] == b["pixel_values"] and a["input_ids"] == b["input_ids"]


def bad_args(tmp_path, rows, *extra, model=VLM):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    return ["run", "-m", "sft", f"data.train={data}", f"model.name_or_path={model}",
            f"train.output_dir={tmp_path / 'out'}", "train.max_steps=1", "train.save_steps=null", "train.plots=false",
            "train.disable_tqdm=true", "train.eval_on_start=false", "train.eval_steps=null", *extra]


def test_a_missing_image_file_is_refused_naming_the_row_and_the_file(tmp_path):
    write_images(tmp_path / "pics", ["red"])
    line = refused(*bad_args(tmp_path, image_rows(("red", "blue"))), written=tmp_path / "out")
    assert f"train.jsonl), row 1: 'images' item 0: no such image file {tmp_path / 'pics' / 'blue.png'}" in line


def test_an_undecodable_image_is_refused(tmp_path):
    write_images(tmp_path / "pics", ["red"])
    (tmp_path / "pics" / "blue.png").write_text("not a picture")
    line = refused(*bad_args(tmp_path, image_rows(("red", "blue"))), written=tmp_path / "out")
    assert "row 1: 'images' item 0:" in line and "blue.png is not an image Pillow can decode" in line


@pytest.mark.parametrize("images,placeholders", [(2, 1), (1, 2)])
def test_placeholders_must_match_the_images(tmp_path, images, placeholders):
    write_images(tmp_path / "pics", ["red"])
    row = {"images": ["pics/red.png"] * images, "completion": answer("red"),
           "prompt": [{"role": "user", "content": [{"type": "image"}] * placeholders + [{"type": "text",
                                                                                         "text": "?"}]}]}
    line = refused(*bad_args(tmp_path, [row]), written=tmp_path / "out")
    assert (f"row 0: the row has {placeholders} image placeholder{'s' * (placeholders > 1)}" in line
            and f"and {images} image{'s' * (images > 1)} in 'images'" in line)


def test_images_given_to_a_text_only_model_are_refused(tmp_path):
    write_images(tmp_path / "pics", ["red"])
    line = refused(*bad_args(tmp_path, image_rows(("red",)), model="builtin:tiny"), written=tmp_path / "out")
    assert "row 0: the row has 1 image in 'images', but the model is text-only" in line


def test_packing_rows_with_images_is_refused(tmp_path):
    write_images(tmp_path / "pics", ["red"])
    line = refused(*bad_args(tmp_path, image_rows(("red",)), "method.packing=true"), written=tmp_path / "out")
    assert "method.packing=true cannot pack rows with images" in line


def test_a_vlm_folder_without_its_processor_is_refused_by_the_cli(tmp_path):
    cfg = ModelConfig(name_or_path=VLM)
    model = alignkit.load_model(cfg, alignkit.load_tokenizer(cfg), seed=0)
    model.save_pretrained(tmp_path / "model")
    write_images(tmp_path / "pics", ["red"])
    line = refused(*bad_args(tmp_path, image_rows(("red",)), model=tmp_path / "model"), written=tmp_path / "out")
    assert "is a vision-language model (Idefics3ForConditionalGeneration) without its processor" in line


def test_alignkit_format_shows_each_images_placeholder_and_the_trained_tokens(tmp_path):
    write_images(tmp_path / "pics")
    data = write_jsonl(tmp_path / "train.jsonl", image_rows(("red",)))
    result = CliRunner().invoke(cli, ["-q", "format", "-m", "sft", f"data.train={data}", f"model.name_or_path={VLM}",
                                      "-n", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    # one image: its 4 image tokens shown as one placeholder; the completion bracketed as trained
    assert "<|user|>\n  <fake_token_around_image><global-img>[image: 4 tokens]<fake_token_around_image>which colour?" \
        in result.output
    assert "[[re]][[d]]" in result.output and "input: 1 image\n" in result.output


def test_relative_image_paths_resolve_when_the_first_row_has_no_image(tmp_path):
    write_images(tmp_path / "pics", ["red"])
    text_row = {"images": [], "prompt": [{"role": "user", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "yo"}]}
    data = write_jsonl(tmp_path / "train.jsonl", [text_row, *image_rows(("red",))])
    from alignkit.engine.data import load_data

    ds = load_data(data, "train")
    assert ds[1]["images"] == [str(tmp_path / "pics" / "red.png")] and ds[0]["images"] == []


def test_rows_with_images_for_a_formatter_that_does_not_read_them_are_refused(tmp_path):
    """A method whose formatter reads no images (here ORPO's with a formatter that says so) would train on the text
    alone."""
    import dataclasses
    from types import SimpleNamespace

    import alignkit_orpo
    from alignkit.formatters import PreferenceFormatter
    from alignkit.testing import plugin_manager

    class TextPairs(PreferenceFormatter):
        reads_images = False

    text_only = SimpleNamespace(register_methods=alignkit.registers(
        dataclasses.replace(alignkit_orpo.METHOD, name="text-pairs", formatter=TextPairs)))

    write_images(tmp_path / "pics", ["red"])
    rows = [{"images": ["pics/red.png"], "prompt": question(), "chosen": answer("red"), "rejected": answer("blue")}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        alignkit.run("text-pairs", {"data": {"train": data}, "model": {"name_or_path": VLM},
                                    "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1}},
                     plugins=plugin_manager(text_only))
    assert not (tmp_path / "out").exists()
    assert "the rows have images, and the text-pairs method's formatter" in str(e.value)
    assert "does not read them" in str(e.value)
