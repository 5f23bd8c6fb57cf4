"""alignkit.blocks.logps.TokenScorer: per-token log-probs and entropy at a temperature, and a term that reads each
chunk's full-vocabulary log-probs, against a plain computation over the model's full logits (float64)."""

import pytest
import torch

from alignkit.blocks.logps import TokenScorer
from alignkit.testing import tiny_model

TAU = 0.7


def batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a 3-token prompt
    return {"input_ids": ids, "attention_mask": mask}, labels


def reference(model, inputs, labels, temperature):
    """log p(label), entropy and full log-probs [N, V] at the scored positions, from the full logits in float64."""
    logits = model(**inputs).logits[:, :-1].double() / temperature
    select = labels[:, 1:] != -100
    logprobs = torch.log_softmax(logits[select], -1)
    logps = logprobs.gather(-1, labels[:, 1:][select][:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logps, entropy, logprobs


@pytest.mark.parametrize("implementation", ["chunked", "plain"])
@pytest.mark.parametrize("temperature", [1.0, TAU])
def test_logps_and_entropy_at_a_temperature_equal_the_full_logits(implementation, temperature):
    model = tiny_model(seed=1).eval()
    inputs, labels = batch()
    want_logps, want_entropy, _ = reference(model, inputs, labels, temperature)
    scorer = TokenScorer(chunk_size=4, implementation=implementation, temperature=temperature)
    with torch.no_grad():
        got = scorer(model, inputs, labels, stats=lambda logits, t: (logits.argmax(-1) == t,))
    assert torch.allclose(got.logps.double(), want_logps, atol=1e-5)
    assert torch.allclose(got.entropy.double(), want_entropy, atol=1e-5)
    assert got.per_token().shape == (3, 8) and torch.allclose(got.per_row().double(), got.per_token().double().sum(-1))
    assert got.extra[0].shape == want_logps.shape
    if temperature != 1.0:  # the temperature changes the numbers
        plain_logps, _, _ = reference(model, inputs, labels, 1.0)
        assert not torch.allclose(got.logps.double(), plain_logps, atol=1e-3)


def jsd(student_logprobs, teacher_logprobs, beta=0.5):
    """Generalised Jensen-Shannon divergence per position (GKD's), summed over the vocabulary."""
    dtype = student_logprobs.dtype
    mix = torch.logsumexp(torch.stack([student_logprobs + torch.log(torch.tensor(1 - beta, dtype=dtype)),
                                       teacher_logprobs + torch.log(torch.tensor(beta, dtype=dtype))]), 0)
    kl_t = (teacher_logprobs.exp() * (teacher_logprobs - mix)).sum(-1)
    kl_s = (student_logprobs.exp() * (student_logprobs - mix)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("implementation", ["chunked", "plain"])
def test_a_divergence_term_reads_each_chunks_full_distribution_with_gradients(implementation):
    """A distillation-style JSD to a teacher's distribution through the scorer (chunks of 4 positions, the fused
    head on the chunked path) equals the JSD over the full logits: the value and the gradient of every parameter."""
    inputs, labels = batch()
    teacher = tiny_model(seed=2).eval()
    with torch.no_grad():
        _, _, teacher_N = reference(teacher, inputs, labels, TAU)

    want_model = tiny_model(seed=1)
    _, _, student_N = reference(want_model, inputs, labels, TAU)
    want = jsd(student_N, teacher_N).sum()
    want.backward()

    model = tiny_model(seed=1)
    scorer = TokenScorer(chunk_size=4, implementation=implementation, temperature=TAU)
    seen = []

    def term(logps_n, positions, logprobs_nV):
        seen.append(logprobs_nV.shape[0])
        return jsd(logprobs_nV.double(), teacher_N[positions]).sum()

    got = scorer(model, inputs, labels, term=term, distribution=True)
    got.total.backward()
    assert got.total.item() == pytest.approx(want.item(), rel=1e-5)
    if implementation == "chunked":
        assert seen == [4] * (len(teacher_N) // 4) + ([len(teacher_N) % 4] if len(teacher_N) % 4 else [])
    for (name, p), q in zip(model.named_parameters(), want_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad.double(), q.grad.double(), atol=1e-5, rtol=1e-4), name


def test_a_differentiable_logp_without_a_term_matches_the_full_logits_gradient():
    inputs, labels = batch()
    want_model, model = tiny_model(seed=1), tiny_model(seed=1)
    want_logps, _, _ = reference(want_model, inputs, labels, TAU)
    want_logps.sum().backward()
    got = TokenScorer(chunk_size=4, temperature=TAU)(model, inputs, labels)
    got.logps.sum().backward()
    for p, q in zip(model.parameters(), want_model.parameters()):
        assert torch.allclose(p.grad.double(), q.grad.double(), atol=1e-5, rtol=1e-4)


def test_a_temperature_that_is_not_positive_is_refused():
    from alignkit import ConfigError

    with pytest.raises(ConfigError, match="temperature must be positive, got 0"):
        TokenScorer(temperature=0)
