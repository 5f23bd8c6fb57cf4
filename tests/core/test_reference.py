"""The reference model of every method that takes one: an explicit `model.ref_name_or_path` is that model, with
and without LoRA on the policy (issue 21, gap 2: with LoRA it used to be ignored for the adapter-free policy)."""

import pytest
import torch

import alignkit
from alignkit.engine.loop import Engine
from alignkit.plugins import get_plugin_manager
from alignkit.testing import tiny_model
from helpers import fast

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
KEY = "model.embed_tokens.weight"


def methods_with_reference(pm) -> dict[str, dict]:
    """Each installed method whose loss needs a reference model, with the overrides that make it need one."""
    found = {}
    for m in alignkit.methods(pm):
        for extra in ({}, {"method.beta": 0.1}):  # a method whose default beta loads no reference
            try:
                cfg, method = alignkit.load_config(m.name, {}, extra, plugins=pm)
            except alignkit.ConfigError:
                continue
            if method.loss(cfg.method).needs_reference_model:
                found[m.name] = extra
                break
    return found


def test_the_shipped_methods_with_a_reference_are_found():
    assert {"dpo", "kto", "grpo"} <= set(methods_with_reference(get_plugin_manager()))


@pytest.mark.parametrize("peft", [None, LORA], ids=["full", "lora"])
def test_an_explicit_reference_is_that_model(tmp_path, peft):
    pm = get_plugin_manager()
    tiny_model(seed=9).save_pretrained(tmp_path / "ref")
    want = tiny_model(seed=9).state_dict()[KEY]
    for name, extra in methods_with_reference(pm).items():
        cfg, method = alignkit.load_config(name, fast(tmp_path / name, max_steps=1),
                                           {**extra, "model.ref_name_or_path": str(tmp_path / "ref"),
                                            "model.peft": peft}, plugins=pm)
        engine = Engine(cfg, method, pm, model=tiny_model(seed=3)).load()
        assert engine.reference.model is not None, name
        ref = engine.accelerator.unwrap_model(engine.reference.model)
        assert torch.equal(ref.state_dict()[KEY], want), name
        assert not any(p.requires_grad for p in ref.parameters()), name


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_reference_outputs_with_lora_are_the_explicit_models(tmp_path, name):
    pm = get_plugin_manager()
    tiny_model(seed=9).save_pretrained(tmp_path / "ref")
    cfg, method = alignkit.load_config(name, fast(tmp_path, max_steps=1),
                                       {"model.ref_name_or_path": str(tmp_path / "ref"), "model.peft": LORA},
                                       plugins=pm)
    engine = Engine(cfg, method, pm, model=tiny_model(seed=3)).load()
    data = engine.data.formatted(True)["train"]
    batch = engine.formatter.collate([data[i] for i in range(4)])
    got = engine.reference(engine.model, dict(batch))
    with torch.no_grad():
        teacher = engine.loss.reference(tiny_model(seed=9).eval(), dict(batch))
        own = engine.loss.reference(tiny_model(seed=3).eval(), dict(batch))
    for key in got:
        assert torch.allclose(got[key], teacher[key], atol=1e-5), key
    assert any(not torch.allclose(got[k], own[k], atol=1e-3) for k in got)
