"""`alignkit format` and `alignkit config --schema`, through the CLI as a user sees them."""

import json
import re

import pytest
from click.testing import CliRunner

from alignkit.cli.commands import cli
from alignkit.testing import tiny_tokenizer


@pytest.fixture(autouse=True)
def installed_plugins(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_LOAD_PLUGINS", raising=False)


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_schema_has_every_field_with_its_description():
    schema = json.loads(run("config", "--method", "orpo", "--schema"))
    assert list(schema["properties"]) == ["model", "data", "train", "generation", "rewards", "method"]
    beta = schema["$defs"]["ORPOMethodConfig"]["properties"]["beta"]
    assert beta["default"] == 0.1 and "odds-ratio" in beta["description"]
    lr = schema["$defs"]["TrainConfig"]["properties"]["learning_rate"]
    assert lr["exclusiveMinimum"] == 0 and lr["description"]


def test_format_marks_exactly_the_labelled_tokens():
    from alignkit.blocks.demo import load_sort as load

    out = run("format", "--method", "orpo", "-n", "2")
    assert out.count("--- example") == 2 and "0 truncated, 0 dropped" in out
    row = load("sort", "train")[0]
    tok = tiny_tokenizer()
    answer_tokens = [tok.decode([t]) for t in tok(row["chosen"], add_special_tokens=False)["input_ids"]] + ["</s>"]
    chosen_line = out.split("chosen (")[1].splitlines()[1]
    assert re.findall(r"\[\[(.*?)\]\]", chosen_line) == answer_tokens
    assert chosen_line.startswith("  <s>" + row["prompt"])


def test_format_shows_truncation_and_works_for_any_method():
    out = run("format", "--method", "simpo", "-n", "3", "method.max_length=8", "method.max_prompt_length=4")
    assert "3 truncated" in out
    chat = run("format", "--method", "dpo", "-n", "1", "data.train=builtin:sort-chat")
    assert "<|assistant|>" in chat and "[[<|end|>]]" in chat
