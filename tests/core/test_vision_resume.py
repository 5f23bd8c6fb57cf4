"""Issue 25, item 5 (in part): a vision-language run stopped after a checkpoint and resumed equals the uninterrupted
run exactly (metrics and weights), as the text runs do (tests/core/test_engine.py)."""

import alignkit_sft
import pytest
import torch
from safetensors.torch import load_file

import alignkit
from alignkit.plugin import hookimpl
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl


class Interrupt(Exception):
    pass


class StopAfterSave:
    @hookimpl
    def on_save(self, run, step, path):
        raise Interrupt(step)


def test_a_resumed_vision_language_run_equals_the_uninterrupted_one(tmp_path):
    cfg = fast(tmp_path / "full", max_steps=4, save_steps=2, logging_steps=1, eval_steps=2, learning_rate=3e-3)
    cfg["data"] = {"train": "builtin:shapes-sft", "max_train_samples": 12, "max_eval_samples": 4}
    cfg["model"] = {"name_or_path": "builtin:tiny-vlm", "freeze_vision_tower": False}  # every part's state resumes
    full = alignkit.run("sft", cfg, plugins=plugin_manager(alignkit_sft))
    cfg["train"]["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(Interrupt):
        alignkit.run("sft", cfg, plugins=plugin_manager(alignkit_sft, StopAfterSave()))
    resumed = alignkit.run("sft", cfg, plugins=plugin_manager(alignkit_sft),
                           **{"train.resume_from_checkpoint": "auto"})
    assert resumed.global_step == full.global_step == 4
    assert read_jsonl(resumed.output_dir / "metrics.jsonl") == read_jsonl(full.output_dir / "metrics.jsonl")
    wf = load_file(full.output_dir / "model.safetensors")
    wr = load_file(resumed.output_dir / "model.safetensors")
    assert any(".vision_model." in k for k in wf) and all(torch.equal(wf[k], wr[k]) for k in wf)
