"""MoE models: with output_router_logits the model's load-balancing loss joins the ORPO loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import alignkit
from alignkit_orpo import ORPOLoss, ORPOMethodConfig
from helpers import fast, two_pairs


def tiny_mixtral(route: bool):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=route, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def test_router_aux_loss_is_added_scaled_by_its_coefficient():
    model, b = tiny_mixtral(route=True), two_pairs()
    loss = ORPOLoss(ORPOMethodConfig())
    loss.prepare_model(model)
    out = loss(model, b)
    aux = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True).aux_loss
    assert aux.item() > 0
    assert out.terms["batches"].item() == pytest.approx(0.02 * aux.item(), rel=1e-6)
    counts = loss.counts(b)
    without_aux = out.terms["nll_tokens"] / counts["nll_tokens"] + out.terms["pairs"] / counts["pairs"]
    assert out.normalized(counts).item() == pytest.approx(without_aux.item() + 0.02 * aux.item(), rel=1e-6)
    # metrics are computed before the aux term: nll_loss is the NLL alone
    assert out.metrics["nll_loss"].item() == pytest.approx((out.terms["nll_tokens"] / counts["nll_tokens"]).item())


def test_no_aux_term_without_output_router_logits():
    model = tiny_mixtral(route=False)
    loss = ORPOLoss(ORPOMethodConfig())
    loss.prepare_model(model)
    assert "batches" not in loss(model, two_pairs()).terms


def test_moe_model_trains(pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=3, learning_rate=3e-3), plugins=pm, model=tiny_mixtral(True))
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.metrics["loss"]))
