"""LLM-judge rewards (issue 24, item 3): `judge:MODEL` asks a causal LM (a folder, or builtin:tiny) with a prompt
template for a 0-9 score, read from the log-probs of the digit tokens after the prompt (deterministic, in [0, 1]);
`Judge.compare` asks it which of two completions is better (for Online DPO). A model that cannot be a judge is one
line, exit 2, before anything is written."""

import pytest
import torch

import alignkit
from alignkit.config import ModelConfig, RewardsConfig
from alignkit.errors import AlignkitError
from alignkit.online import Judge
from alignkit.online.rewards import RewardRegistry, score
from helpers import read_jsonl, refused

PROMPTS = ["sort: 3 1 2 =", "sort: 9 8 =", "sort: 5 4 6 ="]
COMPLETIONS = ["1 2 3", "8 9 9 9 9", "banana"]


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng():
        tokenizer = alignkit.load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
        model = alignkit.load_model(ModelConfig(name_or_path="builtin:tiny"), tokenizer, seed=0).eval()
    return model, tokenizer


def by_hand(model, tokenizer, text, labels):
    """The softmax over the label tokens of the next-token logits after `text` (the tokenizer's own special
    tokens), computed here from the model directly."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    label_ids = [tokenizer.convert_tokens_to_ids(label) for label in labels]
    return torch.softmax(logits[label_ids].double(), -1)


def judge_reward(name="judge:builtin:tiny", **settings):
    return RewardRegistry(settings=RewardsConfig(**settings)).select([name])[0][1]


def test_the_score_is_the_expected_digit_under_the_judges_next_token_distribution(tiny):
    model, tokenizer = tiny
    fn = judge_reward()
    out = score([("judge", fn)], PROMPTS, COMPLETIONS, {})[:, 0].tolist()
    template = "Question: {prompt}\nAnswer: {completion}\nRate the answer from 0 (wrong) to 9 (right).\nScore: "
    template = RewardsConfig(judge_template=template).judge_template
    fn_custom = judge_reward(judge_template=template)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        probs = by_hand(model, tokenizer, Judge.SCORE_TEMPLATE.format(prompt=p, completion=c), "0123456789")
        assert out[i] == pytest.approx(float((probs * torch.arange(10)).sum() / 9), abs=1e-5)
        assert 0.0 <= out[i] <= 1.0
    custom = fn_custom(PROMPTS, COMPLETIONS)
    probs = by_hand(model, tokenizer, template.format(prompt=PROMPTS[0], completion=COMPLETIONS[0]), "0123456789")
    assert custom[0] == pytest.approx(float((probs * torch.arange(10)).sum() / 9), abs=1e-5)
    assert custom != pytest.approx(out, abs=1e-7)  # the template is what the judge reads
    assert len(set(out)) == 3  # each completion is judged on its own text


def test_scores_are_deterministic_and_do_not_depend_on_the_batch():
    fn = judge_reward()
    rng = torch.get_rng_state()
    together = fn(PROMPTS, COMPLETIONS)
    assert torch.equal(torch.get_rng_state(), rng)  # loading the built-in judge leaves the run's random state alone
    alone = [judge_reward()([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    assert together == pytest.approx(alone, abs=1e-6)
    assert fn(PROMPTS, COMPLETIONS) == together


def test_compare_is_the_preference_for_the_first_averaged_over_both_orders(tiny):
    model, tokenizer = tiny
    judge = Judge(model, tokenizer)
    firsts, seconds = COMPLETIONS, ["3 2 1", "8 9", "banana"]
    p = judge.compare(PROMPTS, firsts, seconds)
    assert all(0.0 <= x <= 1.0 for x in p)
    assert judge.compare(PROMPTS, seconds, firsts) == pytest.approx([1 - x for x in p], abs=1e-6)
    assert p[2] == pytest.approx(0.5, abs=1e-6)  # the same completion twice: no preference
    a_first = by_hand(model, tokenizer, Judge.PAIR_TEMPLATE.format(prompt=PROMPTS[0], first=firsts[0],
                                                                    second=seconds[0]), "AB")[0]
    a_second = by_hand(model, tokenizer, Judge.PAIR_TEMPLATE.format(prompt=PROMPTS[0], first=seconds[0],
                                                                     second=firsts[0]), "AB")[1]
    assert p[0] == pytest.approx(float(a_first + a_second) / 2, abs=1e-5)


def test_a_saved_causal_lm_folder_judges_as_the_model_it_holds(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    expected = judge_reward()(PROMPTS, COMPLETIONS)
    assert judge_reward(f"judge:{tmp_path / 'judge'}")(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-6)
    assert judge_reward(f"judge:model:{tmp_path / 'judge'}")(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("reward, said", [
    ("judge:/no/such/folder", "no such model folder"),
    ("judge:", "names no model"),
])
def test_a_judge_that_cannot_be_loaded_is_one_line_before_any_write(tmp_path, reward, said):
    out = tmp_path / "out"
    line = refused("run", "-m", "grpo", f"train.output_dir={out}", f"method.reward_funcs=['{reward}']",
                   "method.sft_warmup_steps=0", "train.max_steps=1", written=out)
    assert "method.reward_funcs" in line and reward in line and said in line, line


def test_a_folder_that_is_not_a_causal_lm_is_refused(tmp_path, tiny):
    _, tokenizer = tiny
    with torch.random.fork_rng():
        classifier = alignkit.load_model(ModelConfig(name_or_path="builtin:tiny"), tokenizer, 0, "sequence-classifier")
    classifier.save_pretrained(tmp_path / "rm")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for folder, said in ((tmp_path / "rm", "not a causal language model"), (tmp_path / "empty", "no config.json")):
        line = refused("run", "-m", "grpo", f"train.output_dir={out}", f"method.reward_funcs=[judge:{folder}]",
                       "method.sft_warmup_steps=0", "train.max_steps=1", written=out)
        assert f"judge:{folder}" in line and said in line, line


@pytest.mark.parametrize("key, value, said", [
    ("judge_template", "'Rate {completion}'", "must use exactly the fields {completion}, {prompt}"),
    ("judge_pairwise_template", "'{prompt} {first}'", "{first}, {prompt}, {second}"),
    ("judge_template", "'{prompt} {completion} {'", "is not a template"),
])
def test_a_template_without_its_fields_is_refused(tmp_path, key, value, said):
    out = tmp_path / "out"
    line = refused("run", "-m", "grpo", f"train.output_dir={out}", f"rewards.{key}={value}", written=out)
    assert f"rewards.{key}" in line and said in line, line


def test_a_grpo_run_trains_on_a_judges_scores(tmp_path):
    out = tmp_path / "out"
    try:
        alignkit.run("grpo", **{
            "method.num_generations": 2, "method.max_completion_length": 4, "method.sft_warmup_steps": 0,
            "method.reward_funcs": ["judge:builtin:tiny"], "data.max_train_samples": 8, "train.max_steps": 2,
            "train.per_device_train_batch_size": 2, "train.save_steps": None, "train.plots": False,
            "train.disable_tqdm": True, "train.logging_steps": 1, "train.output_dir": str(out),
            "train.eval_on_start": False, "train.eval_steps": None, "data.max_eval_samples": 4})
    except AlignkitError as e:
        pytest.fail(str(e))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 <= r["rewards/judge:builtin:tiny/mean"] <= 1.0 for r in rows), rows
