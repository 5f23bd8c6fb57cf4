"""Online DPO's ranking and pair layout by hand (ties, NaN rewards, missing EOS, max_length as TRL 1.16's
OnlineDPOTrainer), its IPO, `alignkit format`, and the user mistakes refused in one line before any write."""

import math

import pytest
import torch
from alignkit_dpo import DPOLoss
from alignkit_dpo.losses import Pair
from alignkit_dpo.online import OnlineDPOConfig, OnlineDPOLoss
from alignkit_dpo.online_rollout import OnlineDPORollout, pair_batch, rank_pairs
from click.testing import CliRunner

from alignkit.online import RewardRegistry
from alignkit.testing import tiny_tokenizer
from helpers import refused

NAN = float("nan")


def test_the_higher_score_is_chosen_a_tie_keeps_the_first_and_nan_counts_as_zero():
    rewards = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5, 0.5, NAN, -0.5, NAN, NAN])
    eos = torch.ones(10, dtype=torch.bool)
    scores, order = rank_pairs(rewards, eos, None)
    assert scores.tolist() == [0.0, 1.0, 2.0, 1.0, 0.5, 0.5, 0.0, -0.5, 0.0, 0.0]
    # pairs (0, 1) second wins, (2, 3) first, (4, 5) tie: first, (6, 7) NaN = 0 > -0.5: first, (8, 9) all NaN: first
    assert order.tolist() == [1, 2, 4, 6, 8, 0, 3, 5, 7, 9]


def test_missing_eos_penalty_lowers_the_score_of_a_completion_without_eos_before_ranking():
    rewards = torch.tensor([1.0, 0.5, 1.0, 1.0])
    eos = torch.tensor([False, True, True, False])
    scores, order = rank_pairs(rewards, eos, 0.75)
    assert scores.tolist() == [0.25, 0.5, 1.0, 0.25]
    assert order.tolist() == [1, 2, 0, 3]
    assert rank_pairs(rewards, eos, None)[1].tolist() == [0, 2, 1, 3]


def _rolled_out():
    return {"prompt_ids": torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9]]),
            "prompt_mask": torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]),
            "completion_ids": torch.tensor([[10, 2, 0], [11, 12, 2], [13, 0, 0], [14, 15, 2]]),
            "completion_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]),
            "rewards": torch.tensor([0.0, 1.0, 1.0, 1.0]), "is_truncated": torch.tensor([False, False, True, False]),
            "completion_length": torch.tensor([2, 3, 1, 3]), "rewards_per_func": torch.tensor([[0.0], [1.0], [1.0],
                                                                                               [1.0]]),
            "reward_names": ["r"]}


def test_pairs_are_chosen_rows_then_rejected_rows_labelled_on_the_completion_only():
    out = _rolled_out()
    scores, order = rank_pairs(out["rewards"], ~out["is_truncated"], None)
    b = pair_batch(out, scores, order, max_length=512)
    assert b["input_ids"].tolist() == [[0, 5, 6, 11, 12, 2], [7, 8, 9, 13, 0, 0],
                                       [0, 5, 6, 10, 2, 0], [7, 8, 9, 14, 15, 2]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                                            [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    x = -100
    assert b["labels"].tolist() == [[x, x, x, 11, 12, 2], [x, x, x, 13, x, x], [x, x, x, 10, 2, x],
                                    [x, x, x, 14, 15, 2]]
    assert b["contain_eos"].tolist() == [True, False, True, True]
    assert b["scores"].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_environment_tokens_of_an_episode_are_read_but_not_trained():
    """Multi-turn rollouts (method.environment): the environment's tokens are in completion_attention_mask, not in
    completion_mask; the pair's rows attend to them and label only the model's own tokens."""
    out = _rolled_out()
    attention = out["completion_mask"].clone()
    out["completion_mask"] = out["completion_mask"].clone()
    out["completion_mask"][0, 1] = 0  # row 0's second completion token came from the environment
    out["completion_attention_mask"] = attention
    scores, order = rank_pairs(out["rewards"], ~out["is_truncated"], None)
    b = pair_batch(out, scores, order, max_length=512)
    row = order.tolist().index(0)
    assert b["attention_mask"][row].tolist() == [0, 1, 1, 1, 1, 0]  # the environment token is read
    assert b["labels"][row].tolist() == [-100, -100, -100, 10, -100, -100]  # and not trained


def test_max_length_cuts_the_first_prompt_columns():
    out = _rolled_out()
    scores, order = rank_pairs(out["rewards"], ~out["is_truncated"], None)
    b = pair_batch(out, scores, order, max_length=4)
    assert b["input_ids"].tolist() == [[6, 11, 12, 2], [9, 13, 0, 0], [6, 10, 2, 0], [9, 14, 15, 2]]
    assert (b["labels"][:, 1:] != -100).sum().item() == 9


def test_ipo_is_online_dpo_trainers_on_summed_log_ratios():
    cfg = OnlineDPOConfig(loss_type="ipo", beta=0.5, reward_funcs=["exact-match"])
    pair = Pair(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]),
                torch.tensor([4]), torch.tensor([2]))
    delta = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    assert OnlineDPOLoss.losses["ipo"](pair, cfg).item() == pytest.approx((delta - 1 / (2 * 0.5)) ** 2)
    assert DPOLoss.losses["ipo"](pair, cfg).item() == pytest.approx((1 / 4 - (-0.5) / 2 - 1) ** 2)  # per token
    assert OnlineDPOLoss.losses["sigmoid"](pair, cfg).item() == pytest.approx(math.log1p(math.exp(-0.5 * delta)))


def test_an_empty_reward_list_is_refused_naming_the_registered_rewards():
    registry = RewardRegistry()
    registry.add("exact-match", lambda prompts, completions, **kw: [0.0] * len(completions))
    with pytest.raises(Exception, match=r"method.reward_funcs is empty.*registered: exact-match.*model:PATH"):
        OnlineDPORollout(OnlineDPOConfig(), tiny_tokenizer(), rewards=registry)


@pytest.mark.parametrize("setting, says", [
    (["method.reward_funcs=[]"], "method.reward_funcs is empty"),
    (["method.reward_funcs=[nope]"], "no reward function 'nope'"),
    (["method.reward_weights=[1.0,2.0]"], "method.reward_weights has 2 entries"),
    (["method.loss_type=dpo_nope"], "is not a loss type"),
    (["method.precompute_ref_log_probs=true"], "method.precompute_ref_log_probs"),
    (["method.missing_eos_penalty=-1"], "missing_eos_penalty"),
    (["method.judge=builtin:tiny"], "method.judge='builtin:tiny': write judge:MODEL"),
    (["method.judge=judge:/no/such/judge"], "method.judge: judge:/no/such/judge: no such model folder"),
])
def test_user_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, setting, says):
    out = tmp_path / "out"
    line = refused("run", "--method", "online-dpo", *setting, f"train.output_dir={out}", written=out)
    assert says in line, line


def test_format_shows_the_prompts_it_trains_on():
    from alignkit.cli.commands import cli

    result = CliRunner().invoke(cli, ["-q", "format", "--method", "online-dpo", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("--- example") == 2 and "sort:" in result.output


def test_a_reward_model_path_that_is_not_a_classifier_is_one_line_exit_2_and_writes_nothing(tmp_path):
    from alignkit.testing import tiny_model

    tiny_model().save_pretrained(tmp_path / "causal")
    tiny_tokenizer().save_pretrained(tmp_path / "causal")
    line = refused("run", "--method", "online-dpo", f"method.reward_funcs=[model:{tmp_path / 'causal'}]",
                   f"train.output_dir={tmp_path / 'out'}", written=tmp_path / "out")
    assert "is a LlamaForCausalLM, not a sequence classifier" in line, line


def test_a_pairwise_judge_ranks_each_pair_by_its_preference():
    """method.judge: the judge's P(first is better) for each pair (first: p, second: 1 - p) decides the chosen row."""
    from alignkit.online import Judge
    from alignkit.online.completions import pad_rows

    tok = tiny_tokenizer()
    rollout = OnlineDPORollout(OnlineDPOConfig(judge="judge:builtin:tiny"), tok)
    texts = ["one two three", "3 2 1", "nine", "seven eight"]
    ids, mask = pad_rows([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id, left=False)
    batch = {"prompt": ["sort: 3 1 2 =", "sort: 9 8 7 ="]}
    p = rollout.judged(batch, {"completion_ids": ids, "completion_mask": mask})
    decoded = tok.batch_decode([i[m.bool()].tolist() for i, m in zip(ids, mask)], skip_special_tokens=True)
    want = Judge.load("builtin:tiny").compare(batch["prompt"], decoded[0::2], decoded[1::2])
    assert p[0::2].tolist() == pytest.approx(want, abs=1e-6) and torch.allclose(p[0::2] + p[1::2], torch.ones(2))
    assert len(set(round(x, 4) for x in want)) == 2  # the two pairs get different preferences: the texts reach it
    _, order = rank_pairs(p, torch.tensor([False, True, True, False]), None)
    assert order.tolist()[:2] == [0 if want[0] >= 0.5 else 1, 2 if want[1] >= 0.5 else 3]
