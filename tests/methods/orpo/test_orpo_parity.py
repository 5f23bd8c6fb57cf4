"""alignkit's ORPO eval metrics equal a float64 reference of the semantics doc, over every data shape."""

import copy

import datasets
import pytest
import torch
from orpo_reference import eval_metrics

import alignkit
from alignkit.testing import tiny_model
from helpers import chat

LONG = " ".join(str(i % 10) for i in range(40))
STANDARD_EXPLICIT = [
    {"prompt": "sort: 3 1 2 =", "chosen": " 1 2 3", "rejected": " 3 2 1"},
    {"prompt": f"sort: {LONG} =", "chosen": " 0 0 0 1 1", "rejected": " 9 9 9"},  # prompt overflows
    {"prompt": "sort: 5 4 =", "chosen": f" {LONG}", "rejected": " 4 5"},  # answer overflows
    {"prompt": "sort: ", "chosen": "1 2", "rejected": "2 1"},  # last prompt token merges with the answer
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
]
STANDARD_IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                     for r in STANDARD_EXPLICIT] + [{"chosen": "abc", "rejected": "abcdef"}]
CONV_EXPLICIT = [
    {"prompt": [chat("user", "sort: 3 1 2")], "chosen": [chat("assistant", "1 2 3")],
     "rejected": [chat("assistant", "3 2 1")]},
    {"prompt": [chat("system", "be brief"), chat("user", f"sort: {LONG}")], "chosen": [chat("assistant", "0 1")],
     "rejected": [chat("assistant", LONG)]},
    {"prompt": [chat("user", "sort: 2 1"), chat("assistant", "1")], "chosen": [chat("assistant", " 2")],
     "rejected": [chat("assistant", " 1")]},
]
CONV_IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                 for r in CONV_EXPLICIT]


def no_bos(tok):
    t = copy.deepcopy(tok)
    t.bos_token = None
    return t


# (a string prompt beside conversational answers is refused since issue 20: tests/test_hostile_data.py)
@pytest.mark.parametrize("rows", [STANDARD_EXPLICIT, STANDARD_IMPLICIT, CONV_EXPLICIT, CONV_IMPLICIT],
                         ids=["standard-explicit", "standard-implicit", "conv-explicit", "conv-implicit"])
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_eval_metrics_equal_the_float64_reference(tok, pm, tmp_path, rows, mode, bos, dtype, rel):
    """In float64 the pipeline must match the reference exactly; in float32, log_odds_chosen (a difference
    of near-equal log odds) carries float32 cancellation of a few 1e-6, hence 1e-5 there."""
    tokenizer = tok if bos else no_bos(tok)
    model = tiny_model(seed=3).to(dtype)
    settings = {"max_length": 24, "max_prompt_length": 12, "mode": mode, "beta": 0.2}
    expected = eval_metrics(model, tokenizer, rows, batch_size=2, **settings)
    got = alignkit.evaluate(
        "orpo", plugins=pm, model=model, tokenizer=tokenizer, eval_dataset=datasets.Dataset.from_list(rows),
        **{"method.max_length": 24, "method.max_prompt_length": 12, "method.truncation_mode": mode,
           "method.beta": 0.2, "train.per_device_eval_batch_size": 2, "train.output_dir": str(tmp_path)})
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=rel / 10), key
