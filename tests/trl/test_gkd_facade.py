"""GKDConfig / GKDTrainer (TRL 1.16's experimental GKD) on the distill method: TRL's fields and defaults, and the
same numbers as `alignkit run --method distill` with the equivalent config."""

import dataclasses
import sys
from pathlib import Path

import pytest
from alignkit_trl import DatasetMixtureConfig, GKDConfig, GKDTrainer, get_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "methods" / "distill"))
from distill_support import save_teacher  # noqa: E402
from test_trl_parity import alignkit_run, assert_same, common_args, facade_rows  # noqa: E402


def test_gkd_config_has_trl_116s_fields_and_defaults():
    from trl.experimental.gkd import GKDConfig as TRLGKDConfig

    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    ours = {f.name: default(f) for f in dataclasses.fields(GKDConfig)}
    theirs = {f.name: default(f) for f in dataclasses.fields(TRLGKDConfig)}
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    assert {k: ours[k] for k in theirs} == theirs


def test_gkd_trainer_trains_as_alignkit_run_distill(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", sharpen=20.0)
    rows = get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-distill"}]))["train"]
    gkd = {"lmbda": 0.5, "seq_kd": True, "max_new_tokens": 6, "beta": 0.3, "temperature": 1.0}
    args = GKDConfig(**common_args(tmp_path), learning_rate=1e-3, teacher_model_name_or_path=teacher, **gkd)
    facade = facade_rows(GKDTrainer("builtin:tiny", args=args, train_dataset=rows))
    run = alignkit_run(tmp_path, "distill", "sort-distill", **{"train.learning_rate": 1e-3,
                                                               "model.ref_name_or_path": teacher,
                                                               **{f"method.{k}": v for k, v in gkd.items()}})
    assert_same(facade, run)
    assert facade[0]["loss"] > 0


def test_gkd_trainer_reads_conversations_and_needs_a_teacher(tmp_path):
    chat = [{"role": "user", "content": "sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}]
    import datasets

    rows = datasets.Dataset.from_list([{"messages": chat}] * 4)
    args = GKDConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="needs a teacher"):
        GKDTrainer("builtin:tiny", args=args, train_dataset=rows)
    t = GKDTrainer("builtin:tiny", teacher_model=save_teacher(tmp_path / "teacher"), args=args, train_dataset=rows)
    expected = t._tokenized(datasets.Dataset.from_list([{"prompt": chat[:1], "completion": chat[1:]}] * 4))
    assert t.train_dataset["input_ids"] == expected["input_ids"]
    assert t.train_dataset["labels"] == expected["labels"]


def test_trls_range_checks_and_refusals():
    with pytest.raises(ValueError, match=r"lmbda must be in the range \[0.0, 1.0\]"):
        GKDConfig(output_dir="x", lmbda=1.5)
    from alignkit.testing import tiny_model

    student = tiny_model()
    rows = get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-distill"}]))["train"]
    with pytest.raises(ValueError, match="cannot be the same object"):
        GKDTrainer(student, teacher_model=student, args=GKDConfig(output_dir="x", use_cpu=True, report_to="none"),
                   train_dataset=rows)
