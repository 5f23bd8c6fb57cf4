"""Every user mistake of the reward method is one line on stderr, exit 2, before anything is written."""

import json

import pytest

from helpers import refused, write_jsonl

KEYS = ("center_rewards_coefficient, max_length, disable_dropout, share_prompt, dataset_num_proc")


@pytest.mark.parametrize(("override", "message"), [
    # TRL's RewardTrainer has one loss: its DPO-style options do not exist here, and the keys that do are named
    ("method.loss_type=hinge", "unknown key 'method.loss_type' (method has: name, " + KEYS + ")"),
    ("method.beta=0.1", "unknown key 'method.beta' (method has: name, " + KEYS + ")"),
    ("method.center_rewards_coefficient=-1", "method.center_rewards_coefficient: Input should be greater than or "
                                             "equal to 0 (got -1)"),
    ("method.max_length=0", "method.max_length: Input should be greater than 0 (got 0)"),
])
def test_a_bad_setting_is_one_line(tmp_path, override, message):
    out = tmp_path / "out"
    line = refused("run", "--method", "reward", override, f"train.output_dir={out}", written=out)
    assert line == f"alignkit: error: {message}"


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": "big"},
     "row 0: 'margin' must be a finite number (how much the chosen answer should win by), got str 'big'"),
    ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": None},
     "row 0: 'margin' must be a finite number (how much the chosen answer should win by), got NoneType 'None'"),
    ({"prompt": "a", "chosen": " b"},
     "row 0: missing column 'rejected'; reward rows need 'chosen' and 'rejected' (and optionally 'prompt' and "
     "'margin'); the row has 'chosen', 'prompt'"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": " b", "rejected": " c"},
     "row 0: 'prompt' is a conversation but 'chosen' a string; a row's columns must all be strings or all be "
     "conversations"),
    ({"chosen_ids": [5, 6]},
     "row 0: a pre-tokenized reward row needs both 'chosen_ids' and 'rejected_ids'; 'rejected_ids' is missing"),
    ({"chosen_input_ids": [5, 6], "rejected_input_ids": [5, "x"]},
     "row 0: 'rejected_input_ids' must be a non-empty list of token ids (non-negative integers), got list "
     "\"[5, 'x']\""),
])
def test_a_bad_row_is_one_line_naming_the_file_and_row(tmp_path, row, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", [row] * 4)
    out = tmp_path / "out"
    line = refused("run", "--method", "reward", f"data.train={data}", f"train.output_dir={out}", written=out)
    assert line == f"alignkit: error: train data ({data}), {message}"


def test_a_margin_of_infinity_is_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"chosen": "a b", "rejected": "a c", "margin": 1.0}).replace("1.0", "Infinity")
                            + "\n" for _ in range(4)))
    out = tmp_path / "out"
    line = refused("run", "--method", "reward", f"data.train={path}", f"train.output_dir={out}", written=out)
    assert "row 0: 'margin' must be a finite number" in line and "inf" in line
