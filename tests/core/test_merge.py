"""`alignkit merge --model ADAPTER_DIR --out DIR` (issue 26): a LoRA run's adapter merged into its base, saved as a
plain model folder that stock transformers loads and that generates what the adapter on its base generates; user
mistakes are one line, exit 2, nothing written."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import alignkit
from alignkit.cli.commands import cli
from alignkit.cli.generate import load
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import fast, refused

PROMPTS = ["sort: 5 3 9 1 =", "sort: 2 8 =", "hello"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA run of SFT on builtin:tiny, with a learning rate high enough that the adapter changes the output."""
    tmp = tmp_path_factory.mktemp("lora")
    return alignkit.run("sft", fast(tmp, learning_rate=1e-2), **{"model.peft.r": 4}).output_dir


def greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def merge(*args):
    return CliRunner().invoke(cli, ["-q", "merge", *map(str, args)])


def test_merged_folder_loads_with_transformers_and_generates_as_the_adapter(adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge("--model", adapter, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()  # a plain model, not an adapter
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    on_base, adapter_tokenizer = load(str(adapter), dtype="float32")
    assert len(tokenizer) == len(adapter_tokenizer)
    for prompt in PROMPTS:
        assert greedy(merged, tokenizer, prompt) == greedy(on_base, adapter_tokenizer, prompt), prompt
    with on_base.disable_adapter():  # the adapter matters: the base alone answers otherwise
        base_tokens = [greedy(on_base, adapter_tokenizer, p) for p in PROMPTS]
    assert base_tokens != [greedy(merged, tokenizer, p) for p in PROMPTS]


def test_an_empty_existing_out_folder_is_used(adapter, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert merge("--model", adapter, "--out", out).exit_code == 0
    assert (out / "model.safetensors").is_file()


def test_a_folder_that_is_not_an_adapter_is_one_line(tmp_path):
    plain = tmp_path / "plain"
    tiny_model().save_pretrained(plain)
    tiny_tokenizer().save_pretrained(plain)
    line = refused("merge", "--model", plain, "--out", tmp_path / "o", written=tmp_path / "o")
    assert "not a LoRA adapter" in line and "adapter_config.json" in line and str(plain) in line


def test_a_missing_folder_is_one_line(tmp_path):
    line = refused("merge", "--model", tmp_path / "nope", "--out", tmp_path / "o", written=tmp_path / "o")
    assert "--model" in line and "no such folder" in line


def test_a_non_empty_out_is_refused_and_left_alone(adapter, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = refused("merge", "--model", adapter, "--out", out)
    assert "--out" in line and "not empty" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_another_runs_folder_as_out_is_refused(adapter, tmp_path):
    before = sorted(p.name for p in adapter.iterdir())
    line = refused("merge", "--model", adapter, "--out", adapter)
    assert "--out" in line
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_out_that_is_a_file_is_refused(adapter, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    assert "--out" in refused("merge", "--model", adapter, "--out", out)
    assert out.read_text() == "x"


def test_an_adapter_whose_config_names_no_base_is_one_line(adapter, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (broken / "adapter_config.json").write_text(json.dumps(config))
    line = refused("merge", "--model", broken, "--out", tmp_path / "o", written=tmp_path / "o")
    assert "base_model_name_or_path" in line
