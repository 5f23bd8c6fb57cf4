"""The distill loss: the generalized JSD against a float64 hand computation, the chunked path (the teacher's hidden
states projected per chunk) equal to full logits in value and gradients, and two cases re-checked against TRL 1.16's
GKDTrainer run for real (benchmarks/compare_distill_with_trl.py)."""

import math
from types import SimpleNamespace

import pytest
import torch
from alignkit_distill import DistillConfig, DistillLoss, generalized_jsd

from alignkit.testing import tiny_model
from helpers import ROOT

IGNORE = -100


def jsd_by_hand(student_logits, teacher_logits, beta) -> float:
    """Summed over positions, in float64: KL(t || s) at beta 0, KL(s || t) at beta 1, else
    beta KL(t || m) + (1 - beta) KL(s || m) with the mixture m = beta t + (1 - beta) s."""
    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    total = 0.0
    for s_row, t_row in zip(torch.softmax(student_logits.double(), -1), torch.softmax(teacher_logits.double(), -1)):
        s, t = s_row.tolist(), t_row.tolist()
        m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
        total += kl(t, s) if beta == 0 else kl(s, t) if beta == 1 else beta * kl(t, m) + (1 - beta) * kl(s, m)
    return total


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_by_hand(beta):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, generator=g) * 2, torch.randn(4, 7, generator=g) * 2
    got = generalized_jsd(torch.log_softmax(s, -1), torch.log_softmax(t, -1), beta).sum().item()
    assert got == pytest.approx(jsd_by_hand(s, t, beta), rel=1e-5)
    if beta == 0.0:  # forward KL(teacher || student) is reverse KL with the roles swapped
        assert got == pytest.approx(jsd_by_hand(t, s, 1.0), rel=1e-5)
    if 0 < beta < 1:  # the interior tends to the ends only after dividing by beta (1 - beta): not the same loss
        assert 0 < got < min(jsd_by_hand(s, t, 0.0), jsd_by_hand(s, t, 1.0))


def batch():
    """Three rows right-padded; prompts of 2-3 tokens untrained, padding untrained."""
    rows = [([1, 40, 41], [50, 51, 52, 2]), ([1, 42], [53, 2]), ([1, 43, 44], [54, 55, 2])]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in rows])
    labels = torch.tensor([[IGNORE] * len(p) + c + [IGNORE] * (width - len(p) - len(c)) for p, c in rows])
    return {"input_ids": ids, "attention_mask": (ids != 0).long() | (torch.arange(width) == 0), "labels": labels}


def full_logits_loss(student, teacher, b, beta):
    """The loss over the models' full logits, in float64: sum of the JSD at trained positions / their count."""
    select = b["labels"][:, 1:] != IGNORE
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][select].double()
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][select].double()
    sl, tl = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    m = torch.logsumexp(torch.stack([sl + math.log1p(-beta), tl + math.log(beta)]), 0) if 0 < beta < 1 else None
    per = {0.0: (tl.exp() * (tl - sl)).sum(-1), 1.0: (sl.exp() * (sl - tl)).sum(-1)}.get(beta)
    if per is None:
        per = beta * (tl.exp() * (tl - m)).sum(-1) + (1 - beta) * (sl.exp() * (sl - m)).sum(-1)
    return per.sum() / select.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("implementation", ["chunked", "plain"])
def test_loss_and_gradients_equal_full_logits(beta, implementation):
    b = batch()
    cfg = DistillConfig(beta=beta, loss_implementation=implementation, logits_chunk_size=3)
    student, teacher = tiny_model(seed=1), tiny_model(seed=2).eval()
    expected_student = tiny_model(seed=1)
    loss = DistillLoss(cfg)
    loss.prepare_model(student)
    with torch.no_grad():
        ref = loss.reference(teacher, b)
    if implementation == "chunked":  # the teacher's final hidden states at the trained positions, not its logits
        assert set(ref) == {"hidden", "head"} and ref["hidden"].shape == (9, teacher.config.hidden_size)
    out = loss(student, b, ref=ref)
    assert loss.counts(b) == {"tokens": 9}
    got = out.terms["tokens"] / 9
    got.backward()
    expected = full_logits_loss(expected_student, teacher, b, beta)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), q in zip(student.named_parameters(), expected_student.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name  # the parity scripts' measure
    kl, n = out.metrics["kl_teacher_student"]
    assert n.item() == 9 and kl.item() / 9 == pytest.approx(full_logits_loss(student, teacher, b, 0.0).item(),
                                                            rel=1e-5)


def test_token_agreement_counts_argmax_matches():
    b = batch()
    model = tiny_model(seed=3).eval()
    loss = DistillLoss(DistillConfig())
    with torch.no_grad():  # the student is its own teacher: every argmax agrees, the divergence is 0
        out = loss(model, b, ref=loss.reference(model, b))
    assert out.metrics["token_agreement"][0].item() == 9 and abs(out.terms["tokens"].item()) < 1e-6


def test_loss_and_gradients_equal_trl(tmp_path, monkeypatch):
    """TRL 1.16's GKDTrainer run for real on two cases of the comparison script: the eval loss at beta 0.5 on
    standard rows, and one step's loss and gradients at beta 0 (standard) and beta 1 (conversational)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import compare_distill_with_trl as cmp

    monkeypatch.setattr(cmp, "CASES", {k: cmp.CASES[k] for k in ("standard-beta0", "conversational-beta1")})
    cmp.make_inputs(tmp_path)
    _, worst = cmp.compare(cmp.alignkit_side(tmp_path), cmp.trl_side(tmp_path))
    assert worst <= 1e-5
    _, grad_worst = cmp.compare_gradients(tmp_path)
    assert grad_worst <= 1e-5


def test_config_ranges():
    for key, value in (("beta", 1.5), ("lmbda", -0.1), ("temperature", 0.0)):
        with pytest.raises(ValueError, match=key):
            DistillConfig(**{key: value})
    assert SimpleNamespace(**DistillConfig().model_dump()).beta == 0.5  # GKDConfig's defaults
    assert (DistillConfig().lmbda, DistillConfig().temperature, DistillConfig().seq_kd) == (0.5, 0.9, False)
