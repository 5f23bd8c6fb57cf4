"""Hostile data (issue 20): data that would train on nothing, or on something else than the user meant, is refused
while it is read, in one line naming the row and the valid choices, before anything is written."""


import datasets
import pytest
from click.testing import CliRunner

from alignkit.cli.commands import cli
from helpers import read_jsonl, refused, write_jsonl

PAIR = {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}
TURN = [{"role": "user", "content": "sort: 2 1"}]
ANSWER = [{"role": "assistant", "content": "1 2"}]


def run_args(tmp_path, method, *extra):
    return ["run", "-m", method, f"train.output_dir={tmp_path / 'out'}", "train.max_steps=1",
            "data.max_train_samples=8",
            "data.max_eval_samples=4", "train.save_steps=null", "train.plots=false", "train.disable_tqdm=true",
            "train.eval_on_start=false", "train.eval_steps=null", *extra]


def test_packing_into_rows_of_one_token_is_refused(tmp_path):
    line = refused(*run_args(tmp_path, "sft", "method.packing=true", "method.max_length=1"), written=tmp_path / "out")
    assert "every one of the 8 examples was dropped" in line and "method.max_length" in line, line


def test_kto_batch_pairing_needs_two_rows_per_micro_batch(tmp_path):
    line = refused(*run_args(tmp_path, "kto", "method.kl_pairing=batch", "train.per_device_train_batch_size=1"),
                   written=tmp_path / "out")
    assert "method.kl_pairing=batch pairs each row with another row of its micro-batch" in line, line
    assert "train.per_device_train_batch_size=1" in line and "method.kl_pairing=fixed" in line, line
    line = refused(*run_args(tmp_path, "kto", "method.kl_group_size=1"), written=tmp_path / "out")
    assert "method.kl_group_size" in line and "greater than or equal to 2" in line, line


@pytest.mark.parametrize("method, row, message", [
    ("orpo", {"prompt": "p", "choosen": " a", "rejeted": " b"},
     "row 0: missing column 'chosen'; preference rows need 'chosen' and 'rejected' (and optionally 'prompt'); the "
     "row has 'choosen', 'prompt', 'rejeted' ('choosen' looks like 'chosen', 'rejeted' like 'rejected')"),
    ("dpo", {"prompt": "p", "Chosen": " a", "Rejected": " b"},
     "missing column 'chosen'; preference rows need 'chosen' and 'rejected' (and optionally 'prompt'); the row has "
     "'Chosen', 'Rejected', 'prompt' ('Chosen' looks like 'chosen', 'Rejected' like 'rejected')"),
    ("kto", {"prompt": "p", "choosen": " a", "rejected": " b"},
     "missing column 'chosen'; expected 'prompt', 'completion' and 'label' (or paired 'chosen' and 'rejected', "
     "optionally with 'prompt'); the row has 'choosen', 'prompt', 'rejected' ('choosen' looks like 'chosen')"),
    ("sft", {"prompt": "p", "completions": " a"},
     "missing column 'completion'; prompt-completion rows need 'prompt' and 'completion'; the row has 'completions', "
     "'prompt' ('completions' looks like 'completion')"),
])
def test_misspelled_columns_are_named(tmp_path, method, row, message):
    data = write_jsonl(tmp_path / "d.jsonl", [row] * 3)
    assert message in refused(*run_args(tmp_path, method, f"data.train={data}"), written=tmp_path / "out")


@pytest.mark.parametrize("method, rows, message", [
    ("orpo", [PAIR, {**PAIR, "prompt": None}], "row 1: 'prompt' is null; give the prompt, or leave the column out"),
    ("dpo", [PAIR, {**PAIR, "prompt": None}], "row 1: 'prompt' is null"),
    ("kto", [PAIR, {**PAIR, "prompt": None}], "row 1: 'prompt' is null"),
    ("orpo", [{"prompt": "sort: 2 1", "chosen": TURN + ANSWER, "rejected": TURN + ANSWER}] * 2,
     "row 0: 'prompt' is a string but 'chosen' a conversation; a row's columns must all be strings or all "
     "be conversations"),
    ("kto", [{"prompt": "sort: 2 1", "chosen": TURN + ANSWER, "rejected": TURN + ANSWER}] * 2,
     "row 0: 'prompt' is a string but 'chosen' a conversation"),
    ("kto", [{"prompt": TURN, "completion": " 1 2", "label": True}] * 2,
     "row 0: 'prompt' and 'completion' must both be strings or both be conversations"),
    ("sft", [{"messages": [{"role": "system", "content": "You sort."}]}] * 2,
     "row 0: 'messages' holds only system messages; a conversation to train on needs a user or assistant turn"),
    ("sft", [{"text": "sort: 2 1 = 1 2", "messages": TURN + ANSWER}] * 2,
     "row 0: the row has both 'text' and 'messages'; give one of them per row"),
])
def test_rows_that_mean_something_else_are_named(tmp_path, method, rows, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert message in refused(*run_args(tmp_path, method, f"data.train={data}"), written=tmp_path / "out")


def test_completion_only_loss_on_language_modeling_rows_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "sort: 2 1 = 1 2"}] * 3)
    line = refused(*run_args(tmp_path, "sft", f"data.train={data}", "method.completion_only_loss=true"),
                   written=tmp_path / "out")
    assert ("row 0: method.completion_only_loss=true needs prompt-completion rows ('prompt' and 'completion'); this "
            "row is language modeling ('text'), with no prompt to mask: set completion_only_loss to null or false"
            ) in line


def test_a_file_mixing_text_rows_and_conversation_rows_trains(tmp_path):
    """datasets fills a column a row lacks with null: a row with `text` and a null `messages` is a text row."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "sort: 2 1 = 1 2"}, {"messages": TURN + ANSWER}] * 2)
    result = CliRunner().invoke(cli, ["-q", *run_args(tmp_path, "sft", f"data.train={data}")])
    assert result.exit_code == 0, result.output


def test_a_read_only_save_to_disk_folder_gets_no_cache_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([PAIR] * 12).save_to_disk(folder)
    before = sorted(p.name for p in folder.iterdir())
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        result = CliRunner().invoke(cli, ["-q", *run_args(tmp_path, "orpo", f"data.train={folder}",
                                                           "data.eval_fraction=0.25")])
    finally:
        for p in [folder, *folder.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert result.exit_code == 0, (result.output, result.exception)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [r["step"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in r] == [1]
    assert any(p.name.startswith("cache-") for p in (tmp_path / "cache" / "alignkit").rglob("*")), "no cache kept"


def test_format_shows_each_kto_rows_label(tmp_path):
    rows = [{"prompt": "sort: 2 1 =", "completion": " 1 2", "label": True},
            {"prompt": "sort: 3 1 =", "completion": " 3 1", "label": False}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = CliRunner().invoke(cli, ["format", "--method", "kto", f"data.train={data}", "-n", "2"])
    assert result.exit_code == 0, result.output
    examples = result.output.split("--- example ")[1:]
    assert [e.splitlines()[1] for e in examples] == ["label: true (desirable)", "label: false (undesirable)"]


