"""The ORPO loss and metrics against hand-worked values and a naive float64 reference."""

import math

import pytest
import torch

from alignkit import log1mexp
from alignkit_orpo import ORPOLoss, ORPOMethodConfig, odds_ratio_terms
from helpers import FixedLogits, two_pairs


def test_odds_ratio_by_hand():
    # p_chosen = 1/2 -> odds 1; p_rejected = 1/4 -> odds 1/3; log odds ratio = log 3; sigma(log 3) = 3/4.
    loss, log_odds, log_sigma = odds_ratio_terms(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), 0.1)
    assert log_odds.item() == pytest.approx(math.log(3), rel=1e-6)
    assert log_sigma.item() == pytest.approx(math.log(0.75), rel=1e-6)
    assert loss.item() == pytest.approx(-0.1 * math.log(0.75), rel=1e-6)


@pytest.mark.parametrize("x", [-1e-7, -1e-6, -1e-3, -0.5, -0.6931, -0.7, -5.0, -80.0, -1e4])
def test_log1mexp_matches_float64(x):
    expected = math.log(-math.expm1(x))
    assert log1mexp(torch.tensor(x)).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("x", [0.0, -0.0, -1e-30, -1e-8])
def test_log1mexp_is_clamped_above_minus_1e7(x):
    """Where float32 exp(x) rounds to 1 (TRL: -inf) the value is that of -1e-7, with a bounded gradient."""
    t = torch.tensor(x, requires_grad=True)
    value = log1mexp(t)
    value.backward()
    assert value.item() == pytest.approx(math.log(-math.expm1(-1e-7)), rel=1e-5)
    assert torch.isfinite(t.grad)


def naive_orpo(logits, input_ids, mask, labels, beta):
    """The semantics doc, written out with loops in float64."""
    logits, n = logits.double(), input_ids.shape[0] // 2
    logp = torch.log_softmax(logits, -1)
    nll_terms = [-logp[i, t - 1, input_ids[i, t]] for i in range(n) for t in range(1, input_ids.shape[1]) if mask[i, t]]
    nll = sum(nll_terms) / len(nll_terms)
    seq = []
    for i in range(2 * n):
        toks = [logp[i, t - 1, labels[i, t]] for t in range(1, labels.shape[1]) if labels[i, t] != -100]
        seq.append(sum(toks) / len(toks))
    lc, lr = torch.stack(seq[:n]), torch.stack(seq[n:])
    odds = (lc - torch.log(1 - torch.exp(lc))) - (lr - torch.log(1 - torch.exp(lr)))
    ratio = torch.nn.functional.logsigmoid(odds)
    return {
        "loss": nll - (beta * ratio).mean(), "nll_loss": nll, "log_odds_ratio": ratio.mean(),
        "log_odds_chosen": odds.mean(), "rewards/chosen": (beta * lc).mean(), "rewards/rejected": (beta * lr).mean(),
        "rewards/margins": (beta * (lc - lr)).mean(), "rewards/accuracies": (lc > lr).double().mean(),
        "logps/chosen": lc.mean(), "logps/rejected": lr.mean(),
        "logits/chosen": logits[:n, :-1].mean(), "logits/rejected": logits[n:, :-1].mean(),
    }


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_loss_and_every_metric_match_naive_reference(beta):
    torch.manual_seed(0)
    batch = two_pairs()
    logits = torch.randn(4, 5, 11) * 3
    loss_fn = ORPOLoss(ORPOMethodConfig(beta=beta))
    out = loss_fn(FixedLogits(logits), batch)
    counts = loss_fn.counts(batch)
    assert counts == {"nll_tokens": 7, "pairs": 2, "batches": 1}
    got = {"loss": out.normalized(counts), **out.metrics}
    expected = naive_orpo(logits, batch["input_ids"], batch["attention_mask"], batch["labels"], beta)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), key


def test_nll_trains_eos_equal_to_pad_id():
    """Padding is masked by the attention mask, so a real token with the pad id still counts."""
    batch = two_pairs()
    batch["input_ids"][0, 4] = 0  # chosen row 0 ends in a token equal to the pad id
    batch["labels"][0, 4] = 0
    assert ORPOLoss(ORPOMethodConfig()).counts(batch)["nll_tokens"] == 7


def test_completion_only_nll_scope():
    torch.manual_seed(1)
    batch, logits = two_pairs(), torch.randn(4, 5, 11)
    loss_fn = ORPOLoss(ORPOMethodConfig(nll_scope="completion"))
    out = loss_fn(FixedLogits(logits), batch)
    logp = torch.log_softmax(logits.double(), -1)
    # completion targets of the chosen rows: row 0 positions 2,3,4; row 1 positions 2,3.
    terms = [logp[0, 1, 6], logp[0, 2, 7], logp[0, 3, 2], logp[1, 1, 8], logp[1, 2, 2]]
    assert loss_fn.counts(batch)["nll_tokens"] == 5
    assert out.metrics["nll_loss"].item() == pytest.approx(-(sum(terms) / 5).item(), rel=1e-6)


def test_gradient_is_finite_when_a_sequence_is_certain():
    """A chosen answer with probability 1 (mean log-prob 0) must not give inf/NaN loss or gradient."""
    lc = torch.tensor([0.0, -1e-12], requires_grad=True)
    lr = torch.tensor([-2.0, -3.0], requires_grad=True)
    loss, _, _ = odds_ratio_terms(lc, lr, 0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()
