"""The DataFormatter interface: one row -> several examples, token fields, and a cache key that covers code."""

import importlib
import sys

import datasets
import pytest

import alignkit
import alignkit_orpo
from alignkit import DataError, load_config
from alignkit.cli.format_view import show_examples
from alignkit.engine.data import prepare
from alignkit.plugin.formatter import infer_token_fields
from alignkit.testing import plugin_manager
from helpers import write_jsonl
from toy_method import ToyConfig, ToyFormatter, ToyPlugin


def test_one_row_may_make_several_examples_and_errors_name_the_raw_row(tok):
    rows = [{"prompt": "a", "completion": ["x", "yy", "z"]}, {"prompt": "b", "completion": ["w"]},
            {"prompt": "c", "completion": []}, {"prompt": "d", "completion": ["v", "u"]}]
    formatted, report = prepare(datasets.Dataset.from_list(rows), ToyFormatter(ToyConfig(), tok), "rows")
    assert len(formatted) == 6 and (report.kept, report.dropped, report.truncated) == (6, 1, 0)
    first = tok("a", add_special_tokens=False)["input_ids"]
    assert [f["input_ids"][:len(first)] for f in formatted][:3] == [first] * 3
    bad = rows[:1] + [{"prompt": None, "completion": ["x"]}]
    with pytest.raises(DataError, match=r"^bad rows, row 1: 'prompt' must be a string$"):
        prepare(datasets.Dataset.from_list(bad), ToyFormatter(ToyConfig(), tok), "bad rows")


def test_token_fields_follow_the_naming_conventions():
    assert infer_token_fields(["input_ids", "labels", "attention_mask"]) == [("input_ids", "labels")]
    assert infer_token_fields(["chosen_input_ids", "chosen_labels", "prompt_input_ids"]) == [
        ("chosen_input_ids", "chosen_labels"), ("prompt_input_ids", None)]


def test_format_command_counts_labels_of_plain_input_ids(tmp_path):
    pm = plugin_manager(alignkit_orpo, ToyPlugin())
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort: 2 1 =", "completion": " 1 2"}])
    cfg, method = load_config("toy", {"data": {"train": data}}, plugins=pm)
    out = show_examples(cfg, method, 1)
    answer = len(alignkit.testing.tiny_tokenizer()(" 1 2", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert f"{answer} labelled" in out and "input (" in out and "0 labelled" not in out


def test_format_command_reads_the_methods_label_pad(tmp_path):
    """A method whose label_pad_token_id is not -100: the masked prompt is not counted as labelled."""
    import alignkit_sft

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort: 2 1 =", "completion": " 1 2"}])
    counts = {}
    for pad in (-100, -1):
        cfg, method = load_config("sft", {"data": {"train": data}, "method": {"label_pad_token_id": pad}},
                                  plugins=plugin_manager(alignkit_sft))
        out = show_examples(cfg, method, 1)
        assert f"(label != {pad})" in out
        counts[pad] = out.split("tokens, ")[1].split(" labelled")[0]
    answer = len(alignkit.testing.tiny_tokenizer()(" 1 2", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert counts == {-100: str(answer), -1: str(answer)}


FORMATTER_V1 = '''
import alignkit
from toy_method import ToyFormatter


class Edited(ToyFormatter):
    def format(self, row):
        out = super().format(row)
        out.features["{name}"] = out.features.pop("input_ids")
        return out
'''


def test_an_edited_formatter_never_serves_stale_cached_data(tmp_path, tok, monkeypatch):
    """The cache key holds the formatter's source: renaming a feature in its code formats the data again
    (the same config used to serve the old features, or crash)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module_path = tmp_path / "edited_formatter.py"
    module_path.write_text(FORMATTER_V1.format(name="ids_v1"))
    module = importlib.import_module("edited_formatter")
    raw = datasets.load_dataset("json", data_files=write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "sort: 2 1 =", "completion": " 1 2"}] * 3), split="train", cache_dir=str(tmp_path / "cache"))
    first = module.Edited(ToyConfig(), tok)
    before = first.fingerprint()
    formatted, _ = prepare(raw, first, "d")
    assert "ids_v1" in formatted.column_names
    assert prepare(raw, module.Edited(ToyConfig(), tok), "d")[0].cache_files == formatted.cache_files  # cached
    module_path.write_text(FORMATTER_V1.format(name="renamed_ids"))  # a new size: Python reloads it within the second
    module = importlib.reload(module)
    second = module.Edited(ToyConfig(), tok)
    assert second.fingerprint() != before
    again, _ = prepare(raw, second, "d")
    assert "renamed_ids" in again.column_names and "ids_v1" not in again.column_names
    sys.modules.pop("edited_formatter", None)


def test_an_edited_helper_module_of_a_plugin_package_changes_the_cache_key(tmp_path, tok, monkeypatch):
    """A plugin's formatter calling a helper from another module of its own package: editing the helper
    changes the fingerprint too (not only alignkit's own modules count)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "third_party_fmt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def suffix():\n    return 'v1'\n")
    (package / "formatter.py").write_text(
        "from third_party_fmt.helpers import suffix\nfrom toy_method import ToyFormatter\n\n\n"
        "class Fmt(ToyFormatter):\n    pass\n")
    module = importlib.import_module("third_party_fmt.formatter")
    before = module.Fmt(ToyConfig(), tok).fingerprint()
    (package / "helpers.py").write_text("def suffix():\n    return 'version 2'\n")  # another size: reloaded
    importlib.reload(sys.modules["third_party_fmt.helpers"])
    module = importlib.reload(module)
    after = module.Fmt(ToyConfig(), tok).fingerprint()
    for name in ("third_party_fmt.formatter", "third_party_fmt.helpers", "third_party_fmt"):
        sys.modules.pop(name, None)
    assert after != before
