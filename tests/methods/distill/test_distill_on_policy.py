"""What TRL 1.16's DistillationTrainer needs of distill: the divergence taken at the sampling temperature
(`temperature_in_loss`), equal to TRL's own `_chunked_divergence_loss`; rows that are prompts alone when every step
samples (lmbda 1 or seq_kd), their evaluation on the student's samples; refused in one line otherwise."""

import pytest
import torch
from alignkit_distill import DistillConfig, DistillLoss
from distill_support import save_teacher
from test_distill_loss import IGNORE, batch

import alignkit
from alignkit.testing import plugin_manager, tiny_model
from helpers import read_jsonl, refused


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_the_divergence_at_temperature_equals_trls(beta, temperature):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    b = batch()
    # float64 on both sides: the math is compared, not float32's rounding (a KL of 0.009 summed from log-probs of
    # size ~6 moves by 1.5e-5 relative between two CPUs' float32 kernels)
    student, teacher = tiny_model(seed=1, tie_word_embeddings=False).double(), tiny_model(seed=2).double().eval()
    twin = tiny_model(seed=1, tie_word_embeddings=False).double()
    loss = DistillLoss(DistillConfig(beta=beta, temperature=temperature, temperature_in_loss=True,
                                     logits_chunk_size=3))
    loss.prepare_model(student)
    with torch.no_grad():
        ref = loss.reference(teacher, b)
    got = loss(student, b, ref=ref).terms["tokens"] / 9
    got.backward()
    # TRL: both models' final hidden states at the positions predicting each completion token, its own chunked loss
    select = (b["labels"][:, 1:] != IGNORE)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "output_hidden_states": True}
    h_s = twin(**inputs).hidden_states[-1][:, :-1]
    with torch.no_grad():
        h_t = teacher(**inputs).hidden_states[-1][:, :-1]
    expected, _, _ = _chunked_divergence_loss(h_s, h_t, twin.lm_head.weight, teacher.lm_head.weight,
                                              select.long(), beta, temperature=temperature)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), q in zip(student.named_parameters(), twin.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name
    if temperature != 1.0:  # the setting matters: at 1 the loss differs
        plain = DistillLoss(DistillConfig(beta=beta, temperature=temperature, logits_chunk_size=3))
        plain.prepare_model(tiny_model(seed=1, tie_word_embeddings=False))
        with torch.no_grad():
            other = plain(tiny_model(seed=1, tie_word_embeddings=False), b, ref=ref).terms["tokens"] / 9
        assert abs(other.item() - got.item()) > 1e-4


def settings(tmp_path, teacher, **method):
    return {"model": {"name_or_path": "builtin:tiny", "ref_name_or_path": teacher},
            "data": {"train": "builtin:sort-prompts", "max_train_samples": 16, "max_eval_samples": 4},
            "method": {"lmbda": 1.0, "max_new_tokens": 6, "temperature_in_loss": True, **method},
            "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                      "per_device_eval_batch_size": 4, "logging_steps": 1, "save_steps": None, "eval_steps": 2,
                      "eval_on_start": True, "disable_tqdm": True, "plots": False, "learning_rate": 1e-3}}


@pytest.mark.parametrize("method", [{}, {"lmbda": 0.0, "seq_kd": True}])
def test_prompts_alone_train_on_samples_and_evaluate_on_the_students(tmp_path, method):
    import alignkit_distill

    teacher = save_teacher(tmp_path / "teacher", sharpen=4.0)
    result = alignkit.run("distill", settings(tmp_path, teacher, **method), plugins=plugin_manager(alignkit_distill))
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(train) == 2 and all(r["loss"] > 0 for r in train)
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval_loss"] > 0 for r in evals), evals


def test_prompts_alone_with_data_steps_are_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    teacher = save_teacher(tmp_path / "teacher")
    line = refused("run", "--method", "distill", f"model.ref_name_or_path={teacher}", "data.train=builtin:sort-prompts",
                   "method.lmbda=0.5", f"train.output_dir={out}", written=out)
    assert "a prompt and no completion" in line and "method.lmbda=1" in line
