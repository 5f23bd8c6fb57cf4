"""DistillationConfig / DistillationTrainer (TRL 1.16's stable distillation trainer) over alignkit's distill method:
TRL's fields and defaults, every step on the student's own samples of prompt rows with the divergence at the
sampling temperature, the same numbers as `alignkit run --method distill` with the equivalent config, and TRL's own
example script (trl/scripts/distillation.py) run offline with its import changed."""

import dataclasses
import math

import pytest
from alignkit_trl import DatasetMixtureConfig, get_dataset
from test_trl_scripts import run_script

import alignkit
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import read_jsonl


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_model(seed=5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_the_fields_and_defaults_are_trls():
    import trl
    from alignkit_trl import DistillationConfig

    ours, theirs = ({f.name: f.default for f in dataclasses.fields(c) if f.init}
                    for c in (DistillationConfig, trl.DistillationConfig))
    assert ours == theirs


def test_refusals_name_the_field_and_the_reason():
    from alignkit_trl import DistillationConfig

    with pytest.raises(ValueError, match="DistillationConfig.top_p=0.9 is not supported by alignkit"):
        DistillationConfig(output_dir="x", top_p=0.9, use_cpu=True).to_alignkit()
    with pytest.raises(ValueError, match="max_completion_length=None"):
        DistillationConfig(output_dir="x", max_completion_length=None, use_cpu=True).to_alignkit()
    with pytest.raises(ValueError, match="teacher_model_init_kwargs.*revision differ"):
        DistillationConfig(output_dir="x", teacher_model_init_kwargs={"revision": "v2"}, use_cpu=True).to_alignkit()
    same = DistillationConfig(output_dir="x", model_init_kwargs={"dtype": "float32"},
                              teacher_model_init_kwargs={"dtype": "float32", "revision": None}, use_cpu=True)
    assert same.to_alignkit()["model.dtype"] == "float32"


def test_distillation_trainer_trains_as_alignkit_run(tmp_path, teacher):
    from alignkit_trl import DistillationConfig, DistillationTrainer

    prompts = get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-prompts"}]))["train"]
    args = DistillationConfig(output_dir=str(tmp_path / "facade"), max_steps=3, per_device_train_batch_size=4,
                              logging_steps=1, report_to="none", bf16=False, disable_tqdm=True, seed=7,
                              save_strategy="no", learning_rate=1e-3, max_completion_length=6, temperature=0.8,
                              beta=0.5, use_cpu=True)
    trainer = DistillationTrainer("builtin:tiny", teacher_model=teacher, args=args, train_dataset=prompts)
    trainer.train()
    facade = [r for r in trainer.state.log_history if "loss" in r]
    out = tmp_path / "run"
    alignkit.run("distill", {
        "model": {"name_or_path": "builtin:tiny", "ref_name_or_path": teacher},
        "data": {"train": "builtin:sort-prompts"},
        "method": {"lmbda": 1.0, "temperature_in_loss": True, "temperature": 0.8, "beta": 0.5, "max_new_tokens": 6,
                   "disable_dropout": False},
        "train": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "seed": 7, "gradient_checkpointing": True, "warmup_ratio": 0.0, "disable_tqdm": True,
                  "plots": False, "save_steps": None, "eval_steps": None, "eval_on_start": False, "report_to": [],
                  "learning_rate": 1e-3}})
    run = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in facade] == [r["step"] for r in run] == [1, 2, 3]
    for a, b in zip(facade, run):
        for key in ("loss", "grad_norm", "learning_rate", "kl_teacher_student"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-6), (a["step"], key, a[key], b[key])


def test_trls_distillation_script_runs_with_the_import_changed(tmp_path, teacher):
    run_script("distillation", tmp_path, "builtin:sort-prompts", teacher_model_name_or_path=teacher,
               max_completion_length=8)
