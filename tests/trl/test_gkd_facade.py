"""GKDConfig / GKDTrainer (TRL 1.16's trl.experimental.gkd surface) over alignkit's distill method: lazily
re-exported by alignkit_trl, TRL's defaults and range checks, the teacher as the reference model, and the same
numbers as `alignkit run --method distill` with the equivalent config."""

import math

import pytest
from alignkit_trl import DatasetMixtureConfig, get_dataset

import alignkit
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import read_jsonl


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_model(seed=5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def rows():
    return get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-distill"}]))["train"]


def test_trls_defaults_and_checks():
    from alignkit_trl import GKDConfig

    args = GKDConfig(output_dir="x", use_cpu=True, report_to="none")
    assert (args.temperature, args.lmbda, args.beta, args.max_new_tokens, args.seq_kd, args.learning_rate,
            args.max_length, args.disable_dropout) == (0.9, 0.5, 0.5, 128, False, 2e-5, 1024, True)
    out = args.to_alignkit()
    assert (out["method.temperature"], out["method.lmbda"], out["method.beta"], out["method.max_new_tokens"]) == \
        (0.9, 0.5, 0.5, 128)
    with pytest.raises(ValueError, match=r"lmbda must be in the range \[0.0, 1.0\]"):
        GKDConfig(output_dir="x", lmbda=1.5)
    with pytest.raises(ValueError, match="GKDConfig.packing=True is not supported by alignkit"):
        GKDConfig(output_dir="x", packing=True, use_cpu=True).to_alignkit()


def test_a_teacher_is_required_and_not_the_student(tmp_path):
    from alignkit_trl import GKDConfig, GKDTrainer

    args = GKDConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="GKDTrainer needs `teacher_model`"):
        GKDTrainer("builtin:tiny", args=args, train_dataset=rows())
    student = tiny_model()
    with pytest.raises(ValueError, match="cannot be the same object"):
        GKDTrainer(student, teacher_model=student, args=args, train_dataset=rows())


@pytest.mark.parametrize("teacher_in", ["trainer", "config"])
def test_gkd_trainer_trains_as_alignkit_run(tmp_path, teacher, teacher_in):
    """lmbda 0.5: some steps on the student's own samples (drawn from the step's seed), the others on the data's
    completions; the loss, gradient norm and teacher-student KL of each step equal the plain run's."""
    from alignkit_trl import GKDConfig, GKDTrainer

    common = {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
              "bf16": False, "disable_tqdm": True, "seed": 7, "save_strategy": "no", "learning_rate": 1e-3,
              "max_new_tokens": 6, "use_cpu": True}
    args = GKDConfig(output_dir=str(tmp_path / "facade"), **common,
                     **({"teacher_model_name_or_path": teacher} if teacher_in == "config" else {}))
    trainer = GKDTrainer("builtin:tiny", teacher_model=teacher if teacher_in == "trainer" else None, args=args,
                         train_dataset=rows())
    trainer.train()
    facade = [r for r in trainer.state.log_history if "loss" in r]
    out = tmp_path / "run"
    alignkit.run("distill", {
        "model": {"name_or_path": "builtin:tiny", "ref_name_or_path": teacher},
        "data": {"train": "builtin:sort-distill"},
        "method": {"temperature": 0.9, "lmbda": 0.5, "beta": 0.5, "max_new_tokens": 6, "max_length": 1024},
        "train": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "seed": 7, "gradient_checkpointing": True, "warmup_ratio": 0.0, "disable_tqdm": True,
                  "plots": False, "save_steps": None, "eval_steps": None, "eval_on_start": False, "report_to": [],
                  "learning_rate": 1e-3}})
    run = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in facade] == [r["step"] for r in run] == [1, 2, 3]
    for a, b in zip(facade, run):
        for key in ("loss", "grad_norm", "learning_rate", "kl_teacher_student"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-6), (a["step"], key, a[key], b[key])
