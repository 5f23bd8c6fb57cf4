"""The reward model's shared-prompt path (method.share_prompt): each pair runs as one row, its prompt once, and
gives the padded batch's rewards, loss, metrics and gradients."""

from types import SimpleNamespace

import pytest
import torch
from alignkit_reward import RewardConfig, RewardLoss
from reward_support import train

from alignkit import ConfigError
from alignkit.testing import FixedLogits
from helpers import read_jsonl, refused

PAD, BOS, EOS = 0, 1, 2


def classifier(attention="sdpa", seed=0, **overrides):
    from transformers import AutoModelForSequenceClassification

    from alignkit.engine.modeling import tiny_llama_config

    torch.manual_seed(seed)
    config = tiny_llama_config(384, num_labels=1, **overrides)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)


def pair_batch(lengths, seed=0):
    """[chosen; rejected] rows, right-padded: each pair a shared prompt (BOS first), then two answers ending in EOS.
    lengths: (prompt, chosen answer, rejected answer) per pair."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for p, a, b in lengths:
        prompt = [BOS] + torch.randint(3, 384, (p - 1,), generator=g).tolist()
        chosen.append(prompt + torch.randint(3, 384, (a - 1,), generator=g).tolist() + [EOS])
        rejected.append(prompt + torch.randint(3, 384, (b - 1,), generator=g).tolist() + [EOS])
    rows = chosen + rejected
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "margin": torch.linspace(-0.5, 0.5, len(lengths))}


def config(**kw):
    return SimpleNamespace(**{"center_rewards_coefficient": 0.01, "disable_dropout": True, "max_length": 1024,
                              "dataset_num_proc": None, "share_prompt": None, **kw})


def forward_rows(model):
    """Records the number of rows of each forward of `model`."""
    rows = []
    model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    return rows


def loss_and_grads(model, batch, **kw):
    loss = RewardLoss(config(**kw))
    loss.prepare_model(model)
    model.zero_grad()
    out = loss(model, batch)
    out.terms["pairs"].backward()
    metrics = {k: float(s) for k, (s, _) in out.metrics.items()}
    return out.terms["pairs"].detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_rows_give_the_padded_batch_loss_metrics_and_gradients(attention):
    model = classifier(attention)
    rows = forward_rows(model)
    batch = pair_batch([(9, 4, 7), (5, 6, 2), (12, 3, 3)])
    shared = loss_and_grads(model, batch)
    assert rows == [3]  # one row per pair: the prompt ran once
    plain = loss_and_grads(model, batch, share_prompt=False)
    assert rows == [3, 6]
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert shared[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-6)
    for name, grad in plain[2].items():
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # and the rewards are the model's own for the padded batch
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    from alignkit.blocks.sharing import sequence_classifier, shared_scores

    got = shared_scores(model, sequence_classifier(model), batch["input_ids"], batch["attention_mask"])[:, 0]
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_pad_id_inside_a_row_is_read_by_the_models_own_rule():
    """With pad = EOS (a tokenizer without a pad token), the model scores the token before the final EOS: so does
    the shared path."""
    model = classifier(pad_token_id=EOS)
    batch = pair_batch([(6, 3, 5), (4, 4, 4)], seed=3)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, EOS)
    shared, plain = loss_and_grads(model, batch), loss_and_grads(model, batch, share_prompt=False)
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)


def test_no_common_prefix_runs_the_padded_batch():
    model = classifier()
    rows = forward_rows(model)
    batch = pair_batch([(5, 3, 4), (4, 2, 2)])
    batch["input_ids"][3, 0] = 7  # the second pair's rejected row starts elsewhere
    loss_and_grads(model, batch)
    assert rows == [4]


def test_share_prompt_true_on_a_model_that_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="method.share_prompt.*sdpa, eager.*share_prompt=false"):
        RewardLoss(config(share_prompt=True)).prepare_model(FixedLogits(torch.zeros(2, 3, 1)))
    RewardLoss(config(share_prompt=None)).prepare_model(FixedLogits(torch.zeros(2, 3, 1)))  # null: not refused
    assert RewardConfig().share_prompt is None


def test_a_run_shares_by_default_and_logs_the_unshared_losses(tmp_path):
    logged = {}
    for name, method in (("shared", {}), ("padded", {"share_prompt": False})):
        _, result = train(tmp_path / name, steps=3, method=method)
        logged[name] = [r["loss"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert len(logged["shared"]) == 3
    assert logged["shared"] == pytest.approx(logged["padded"], rel=1e-4)


def test_share_prompt_true_with_an_attention_that_cannot_share_is_one_line_before_any_write(tmp_path):
    out = tmp_path / "out"
    line = refused("run", "--method", "reward", "method.share_prompt=true", "model.attn_implementation=flex_attention",
                   f"train.output_dir={out}", written=out)
    assert line == ("alignkit: error: method.share_prompt needs a transformers sequence classifier with a pad token "
                    "and an attention implementation in sdpa, eager with full attention in every layer (this model: "
                    "LlamaForSequenceClassification, "
                    "flex_attention); set method.share_prompt=false")
