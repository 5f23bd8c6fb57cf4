"""The reward loss written out by hand (float64), and the rows as TRL 1.16's RewardTrainer tokenizes them."""

import math
from types import SimpleNamespace

import pytest
import torch
from alignkit_reward import RewardFormatter, RewardLoss

from alignkit import DropExample
from helpers import FixedLogits, chat


def config(**kw):
    return SimpleNamespace(**{"center_rewards_coefficient": None, "disable_dropout": True, "max_length": 1024,
                              "dataset_num_proc": None, **kw})


def batch(n=3, margin=None):
    out = {"input_ids": torch.ones(2 * n, 4, dtype=torch.long),
           "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]] * 2)[: 2 * n]}
    if margin is not None:
        out["margin"] = torch.tensor(margin)
    return out


REWARDS = [1.5, -0.25, 0.75, 0.5, 0.8, -2.0]  # chosen 1.5, -0.25, 0.75; rejected 0.5, 0.8, -2.0


@pytest.mark.parametrize(("margin", "coef"), [(None, None), ([0.3, -0.7, 1.1], None), (None, 0.01),
                                              ([0.3, -0.7, 1.1], 0.2)])
def test_loss_metrics_and_gradient_by_hand(margin, coef):
    model = FixedLogits(torch.tensor(REWARDS)[:, None])
    loss = RewardLoss(config(center_rewards_coefficient=coef))
    b = batch(margin=margin)
    out = loss(model, b)
    assert loss.counts(b) == {"pairs": 3, "input_tokens": 18}
    c, r, m = REWARDS[:3], REWARDS[3:], margin or [0.0] * 3

    def pair(i):
        value = math.log1p(math.exp(-(c[i] - r[i] - m[i])))  # -log sigmoid(x)
        return value + (coef or 0.0) * (c[i] + r[i]) ** 2

    expected = sum(pair(i) for i in range(3))
    assert out.terms["pairs"].item() == pytest.approx(expected, rel=1e-6)
    metrics = {k: (float(s), float(n)) for k, (s, n) in out.metrics.items()}
    assert metrics["accuracy"] == (2.0, 3.0)  # 1.5 > 0.5, -0.25 < 0.8, 0.75 > -2.0 (the margin column aside)
    assert metrics["margin"][0] == pytest.approx(sum(c) - sum(r)) and metrics["margin"][1] == 3
    assert metrics["mean_reward"][0] == pytest.approx(sum(REWARDS)) and metrics["mean_reward"][1] == 6
    assert metrics["rewards/chosen"] == pytest.approx((sum(c), 3)) and metrics["rewards/rejected"] == pytest.approx(
        (sum(r), 3))
    out.terms["pairs"].backward()
    sig = [1 / (1 + math.exp(-(c[i] - r[i] - m[i]))) for i in range(3)]  # d/dx -log sigmoid(x) = sigmoid(x) - 1
    grad_c = [sig[i] - 1 + 2 * (coef or 0.0) * (c[i] + r[i]) for i in range(3)]
    grad_r = [1 - sig[i] + 2 * (coef or 0.0) * (c[i] + r[i]) for i in range(3)]
    torch.testing.assert_close(model.logits.grad[:, 0], torch.tensor(grad_c + grad_r), rtol=1e-5, atol=1e-7)


def test_standard_rows_are_one_text_with_eos_as_trl_tokenizes_them(tok):
    f = RewardFormatter(config(), tok)
    explicit = f.format({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}).features
    assert explicit["chosen_ids"] == tok("sort: 3 1 = 1 3</s>")["input_ids"]
    assert explicit["rejected_ids"] == tok("sort: 3 1 = 3 1</s>")["input_ids"]
    assert explicit["chosen_ids"][-1] == tok.eos_token_id
    implicit = f.format({"chosen": "sort: 3 1 = 1 3", "rejected": "sort: 3 1 = 3 1</s>"}).features
    assert implicit["chosen_ids"] == explicit["chosen_ids"]
    assert implicit["rejected_ids"] == explicit["rejected_ids"]  # an answer ending in EOS keeps one


def test_conversational_rows_are_the_chat_template_with_nothing_appended(tok):
    f = RewardFormatter(config(), tok)
    prompt = [chat("user", "sort: 3 1")]
    row = {"prompt": prompt, "chosen": [chat("assistant", "1 3")], "rejected": [chat("assistant", "3 1")]}
    got = f.format(row).features
    want = tok.apply_chat_template(prompt + [chat("assistant", "1 3")], tokenize=True, return_dict=True)["input_ids"]
    assert got["chosen_ids"] == list(want)
    implicit = f.format({"chosen": prompt + [chat("assistant", "1 3")],
                         "rejected": prompt + [chat("assistant", "3 1")]}).features
    assert implicit == got
    assert f.sequence_ids(prompt, "1 3") == got["chosen_ids"]  # how a model:PATH reward reads a completion


def test_a_pair_longer_than_max_length_is_dropped_not_truncated(tok):
    row = {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1 1 1 1"}
    longest = len(tok("sort: 3 1 = 3 1 1 1 1</s>")["input_ids"])
    assert RewardFormatter(config(max_length=longest), tok).format(row).features
    with pytest.raises(DropExample, match="longer than method.max_length"):
        RewardFormatter(config(max_length=longest - 1), tok).format(row)
    assert RewardFormatter(config(max_length=None), tok).format({**row, "rejected": " 1" * 2000}).features


def test_a_batch_is_the_chosen_rows_then_the_rejected_rows_with_the_margins(tok):
    f = RewardFormatter(config(), tok)
    rows = [{"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1", "margin": 0.5},
            {"prompt": "sort: 2 1 7 =", "chosen": " 1 2 7", "rejected": " 7 1 2", "margin": 2}]
    features = [f.format(r).features for r in rows]
    b = f.collate(features)
    assert b["input_ids"].shape[0] == 4 and b["margin"].tolist() == [0.5, 2.0]
    for i, ids in enumerate([features[0]["chosen_ids"], features[1]["chosen_ids"],
                             features[0]["rejected_ids"], features[1]["rejected_ids"]]):
        assert b["input_ids"][i, : len(ids)].tolist() == ids and int(b["attention_mask"][i].sum()) == len(ids)
        assert (b["input_ids"][i, len(ids):] == tok.pad_token_id).all()
    assert "margin" not in f.collate([{k: v for k, v in x.items() if k != "margin"} for x in features])
