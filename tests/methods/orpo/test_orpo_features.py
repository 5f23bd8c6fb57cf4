"""LoRA from the config, generation during eval, and the model card."""

import json

import pytest
import torch
from safetensors.torch import load_file

import alignkit
from alignkit.testing import tiny_model
from helpers import fast, read_jsonl


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_from_config_trains_only_adapters_and_saves_them(pm, tmp_path, checkpointing):
    from peft import PeftModel

    base = tiny_model(seed=2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = alignkit.run("orpo", fast(tmp_path, max_steps=6, learning_rate=1e-2, gradient_checkpointing=checkpointing,
                                       eval_on_start=True),
                          plugins=pm, model=base,
                          **{"model.peft": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    out = result.output_dir
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it learned
    loaded = PeftModel.from_pretrained(tiny_model(seed=2), out)
    for name, value in loaded.get_base_model().state_dict().items():
        clean = name.replace("base_layer.", "")
        if "lora_" not in name and clean in before:
            assert torch.equal(value, before[clean]), name  # the base weights did not move
    evals = [r["eval_loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < evals[0]


def test_generate_during_eval_writes_completions_and_leaves_training_unchanged(pm, tmp_path):
    cfg = fast(tmp_path / "gen", max_steps=4, eval_steps=2)
    with_gen = alignkit.run("orpo", cfg, plugins=pm, **{"method.generate_during_eval": True, "method.max_length": 24,
                                                          "method.max_prompt_length": 16})
    rows = read_jsonl(with_gen.output_dir / "completions.jsonl")
    assert [r["step"] for r in rows] == [2] * 4 + [4] * 4
    assert all(r["prompt"].startswith("sort:") and isinstance(r["completion"], str) for r in rows)
    without = alignkit.run("orpo", fast(tmp_path / "plain", max_steps=4, eval_steps=2), plugins=pm,
                           **{"method.max_length": 24, "method.max_prompt_length": 16})
    assert not (without.output_dir / "completions.jsonl").exists()
    a, b = (load_file(str(with_gen.output_dir / "model.safetensors")),
            load_file(str(without.output_dir / "model.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)  # sampling ran on a forked RNG


def test_model_card(pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=2), plugins=pm)
    card = (result.output_dir / "README.md").read_text()
    front = card.split("---")[1]
    assert 'base_model: "builtin:tiny"' in front and "- alignkit" in front and "- orpo" in front
    assert "method **orpo**" in card and "arXiv:2403.07691" in card and "hong2024orpo" in card
    assert f"| eval_loss | {result.metrics['eval_loss']:.6g} |" in card
    assert "  beta: 0.1" in card and "- transformers: " in card and "- torch: " in card
    own = alignkit.run("orpo", fast(tmp_path / "own", max_steps=1), plugins=pm,
                       **{"data.train": _write(tmp_path), "data.eval_fraction": 0.25})
    assert '- "' + _write(tmp_path) + '"' in (own.output_dir / "README.md").read_text()


def _write(tmp_path) -> str:
    from alignkit.blocks.demo import sort_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sort_pairs(16, seed=9)))
    return str(path)
