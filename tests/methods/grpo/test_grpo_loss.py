"""GRPO maths against hand-worked float64 references: advantages, the clipped surrogate with the k3 KL,
the three token normalisations as loss units, and the memory-lean completion log-probs."""

import math

import pytest
import torch
from alignkit_grpo.advantages import advantages
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.loss import GRPOLoss, per_token_objective, reduce_terms

from alignkit.online.completions import completion_logps
from alignkit.online.groups import combine, std_from_sums
from alignkit.testing import tiny_model


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0], dtype=torch.float64)  # groups of 3
    adv, std = advantages(rewards, 3, "group")
    m0, s0 = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected = [(1 - m0) / (s0 + 1e-4), -m0 / (s0 + 1e-4), -m0 / (s0 + 1e-4)]
    m1, s1 = 5 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected += [(1 - m1) / (s1 + 1e-4), (2 - m1) / (s1 + 1e-4), (2 - m1) / (s1 + 1e-4)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)
    assert std.tolist() == pytest.approx([s0] * 3 + [s1] * 3, rel=1e-12)
    none, _ = advantages(rewards, 3, "none")
    assert none.tolist() == pytest.approx([1 - m0, -m0, -m0, 1 - m1, 2 - m1, 2 - m1], rel=1e-12)
    batch_std = std_from_sums(float(rewards.sum()), float((rewards ** 2).sum()), 6)
    assert batch_std == pytest.approx(float(rewards.std()), rel=1e-12)
    batch, _ = advantages(rewards, 3, "batch", batch_std)
    assert batch.tolist() == pytest.approx([(r - m) / (batch_std + 1e-4) for r, m in
                                            zip(rewards.tolist(), [m0] * 3 + [m1] * 3)], rel=1e-12)


def test_unscorable_completion_is_left_out_of_its_group_and_gets_no_advantage():
    per_func = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), float("nan")], [1.0, 1.0]],
                            dtype=torch.float64)
    rewards = combine(per_func, [1.0, 0.5])
    assert rewards[:2].tolist() == [1.0, 0.5] and math.isnan(rewards[2]) and rewards[3] == 1.5
    adv, _ = advantages(rewards, 4, "group")
    mean, std = 1.0, 0.5  # over 1.0, 0.5, 1.5
    assert adv.tolist() == pytest.approx([0.0, -0.5 / (std + 1e-4), 0.0, 0.5 / (std + 1e-4)], rel=1e-12)
    assert mean == pytest.approx(float(torch.nanmean(rewards)))


def hand_loss(logps, old, ref, adv, mask, cfg: GRPOConfig) -> float:
    """Float64 loops over rows and tokens, written from the GRPO/DAPO/Dr. GRPO definitions."""
    rows = []
    for i in range(len(logps)):
        toks = []
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - cfg.epsilon), 1 + cfg.epsilon_upper)
            value = -min(ratio * adv[i], clipped * adv[i])
            if cfg.beta:
                d = ref[i][t] - logps[i][t]
                kl = math.exp(d) - d - 1
                value += cfg.beta * kl * (ratio if cfg.use_bias_correction_kl else 1.0)
            toks.append(value)
        rows.append(toks)
    if cfg.loss_type == "grpo":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    if cfg.loss_type == "dr_grpo":
        return sum(map(sum, rows)) / (len(rows) * cfg.max_completion_length)
    return sum(map(sum, rows)) / sum(map(len, rows))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_objective_and_its_units_equal_the_hand_reference(loss_type, beta, bias_correction):
    g = torch.Generator().manual_seed(0)
    B, C = 4, 5
    logps = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.3  # some ratios outside the clip range
    ref = logps + torch.randn(B, C, generator=g, dtype=torch.float64) * 0.2
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    cfg = GRPOConfig(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_completion_length=C,
                     use_bias_correction_kl=bias_correction)
    per_token, _, _ = per_token_objective(logps, old, adv, cfg, ref if beta else None)
    # micro-batches of rows [0, 1] and [2, 3]: summed terms / counts over both equal the whole batch's loss
    loss = GRPOLoss(cfg)
    counts: dict = {}
    terms: dict = {}
    for rows in (slice(0, 2), slice(2, 4)):
        part = {"completion_mask": mask[rows], "completion_ids": mask[rows].long()}
        for unit, n in loss.counts(part).items():
            counts[unit] = counts.get(unit, 0) + n
        for unit, term in reduce_terms(per_token[rows], mask[rows], cfg).items():
            terms[unit] = terms.get(unit, 0) + term
    ours = sum(term / counts[unit] for unit, term in terms.items())
    expected = hand_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), cfg)
    assert float(ours) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_beta_zero_loads_no_reference_model():
    assert GRPOLoss(GRPOConfig(beta=0.0)).needs_reference_model is False
    assert GRPOLoss(GRPOConfig(beta=0.04)).needs_reference_model is True


def test_completion_logps_equal_full_logits_in_float64():
    model = tiny_model().double().eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    batch = {"prompt_ids": prompt, "prompt_mask": (prompt != 0).long(),
             "completion_ids": torch.randint(3, 300, (2, 3), generator=g),
             "completion_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    with torch.no_grad():
        logps, entropy = completion_logps(model, batch, temperature=0.7, chunk_size=2)
        ids = torch.cat([prompt, batch["completion_ids"]], 1)
        logits = model(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
                       ).logits[:, 3:-1].double() / 0.7
        full = logits.log_softmax(-1)
        expected = full.gather(-1, batch["completion_ids"][..., None]).squeeze(-1) * batch["completion_mask"]
        expected_entropy = -(full.exp() * full).sum(-1) * batch["completion_mask"]
    assert torch.allclose(logps.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type, lora", [("grpo", False), ("dapo", False), ("dr_grpo", False), ("grpo", True)])
@pytest.mark.parametrize("beta, with_old", [(0.0, False), (0.1, True)])
def test_fused_head_equals_the_checkpointed_path(loss_type, lora, beta, with_old):
    """In training the loss runs the fused head (its gradients computed in the forward, alignkit.blocks.fusedhead): the
    loss, every metric and every parameter's gradient equal the checkpointed chunks' (the head run twice)."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 5, 6]])
    batch = {"prompt_ids": prompt, "prompt_mask": (prompt != 0).long(),
             "completion_ids": torch.randint(3, 300, (3, 4), generator=g),
             "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]),
             "advantages": torch.tensor([0.8, -1.1, 0.3])}
    if with_old:
        batch["old_logps"] = -torch.rand(3, 4, generator=g) * 4
    ref = {"logps": -torch.rand(3, 4, generator=g) * 4} if beta else None
    cfg = GRPOConfig(loss_type=loss_type, beta=beta, logits_chunk_size=3, max_completion_length=4, temperature=0.7)
    results = []
    for fused in (True, False):
        model = tiny_model(seed=3, tie_word_embeddings=False)
        if lora:  # adapters on the head too: their gradients come from the fused head's forward
            import peft

            torch.manual_seed(0)
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                               init_lora_weights=False))
        loss = GRPOLoss(cfg)
        loss.prepare_model(model)
        if not fused:  # no head kept: completion_logps splits it off itself and runs checkpointed chunks
            loss.head = None
        out = loss(model, batch, ref=ref)
        sum(out.terms.values()).backward()
        metrics = {k: float(v[0]) for k, v in out.metrics.items()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: float(v) for k, v in out.terms.items()}, metrics, grads))
    (terms_a, metrics_a, grads_a), (terms_b, metrics_b, grads_b) = results
    assert terms_a == pytest.approx(terms_b, rel=1e-5, abs=1e-6)  # advantages summing to 0: a term near 0
    assert metrics_a == pytest.approx(metrics_b, rel=1e-5, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_b:
        error = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"
