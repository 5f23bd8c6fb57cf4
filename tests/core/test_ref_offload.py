"""model.ref_offload (issue 22, item 5): the reference keeps its weights in CPU memory and visits the device layer by
layer; what it computes is unchanged, and a run where nothing would be offloaded is refused in one line."""

import pytest
import torch

import alignkit
from alignkit.testing import plugin_manager
from helpers import fast, refused


def dpo_run(tmp_path, name, **model):
    import alignkit_dpo

    config = fast(tmp_path / name, max_steps=3)
    config["model"] = model
    return alignkit.run("dpo", config, plugins=plugin_manager(alignkit_dpo))


def test_an_offloaded_reference_computes_what_the_resident_one_does(tmp_path):
    resident = dpo_run(tmp_path, "resident")
    offloaded = dpo_run(tmp_path, "offloaded", ref_offload=True)
    assert offloaded.metrics == pytest.approx(resident.metrics, rel=1e-6, abs=1e-9)


def test_the_offloaded_reference_lives_in_cpu_memory_between_its_forwards(tmp_path):
    import alignkit_dpo

    from alignkit.engine.loop import Engine

    config = fast(tmp_path, max_steps=1)
    config["model"] = {"ref_offload": True}
    pm = plugin_manager(alignkit_dpo)
    cfg, method = alignkit.load_config("dpo", config, plugins=pm)
    engine = Engine(cfg, method, pm)
    engine.setup()
    moves = []
    ref = engine.reference.model
    original = ref.to
    ref.to = lambda device: (moves.append(str(device)), original(device))[1]
    with engine.reference.on_device():
        pass
    assert moves == [str(engine.accelerator.device), "cpu"]
    assert all(p.device == torch.device("cpu") for p in ref.parameters())


@pytest.mark.parametrize(("method", "extra", "said"), [
    ("orpo", [], "model.ref_offload: method orpo uses no reference model; remove the key"),
    ("dpo", ["model.peft.r=4"], "model.ref_offload: with model.peft and no model.ref_name_or_path the reference is "
                                "the policy itself"),
    ("dpo", ["method.sync_ref_model=true"], "model.ref_offload: this method mixes the policy's weights into its "
                                            "reference model"),
])
def test_nothing_to_offload_is_refused_in_one_line(tmp_path, method, extra, said):
    out = tmp_path / "out"
    line = refused("run", "--method", method, "model.ref_offload=true", f"train.output_dir={out}", *extra, written=out)
    assert said in line
