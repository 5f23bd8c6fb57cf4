"""The preference formatter: data shapes, prompt extraction, chat templates, tokenization, truncation."""

import copy

import datasets
import pytest

from alignkit import DataError, DropExample
from alignkit.blocks.text import extract_prompt
from alignkit.engine.data import prepare
from alignkit_orpo import ORPOMethodConfig, PreferenceFormatter
from helpers import chat

BOS, EOS, PAD = 1, 2, 0


NORMAL = {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"}


def same(a, b) -> bool:
    """Two format results agree: equal features and truncation flag, or the same exception and message."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return a.features == b.features and a.truncated == b.truncated


@pytest.fixture(autouse=True)
def batched_tokenization_agrees(monkeypatch):
    """Every row any test here formats is also run through format_batch (one tokenizer call for a batch),
    alone and between other rows: it must give what the per-row rules give."""
    per_row = PreferenceFormatter.format
    busy = []

    def checked(self, example):
        try:
            result = per_row(self, example)
        except (DataError, DropExample) as e:
            result = e
        if not busy:
            busy.append(1)
            try:
                alone = self.format_batch([example])
                among = self.format_batch([NORMAL, example, NORMAL, example])
            finally:
                busy.pop()
            assert same(alone[0], result) and same(among[1], result) and same(among[3], result), example
            assert same(among[0], per_row(self, NORMAL))
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(PreferenceFormatter, "format", checked)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def formatter(tok, **cfg):
    return PreferenceFormatter(ORPOMethodConfig(**cfg), tok)


def test_standard_explicit_prompt(tok):
    out = formatter(tok).format({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"})
    prompt = [BOS] + ids(tok, "sort: 3 1 =")
    assert out.features["chosen_input_ids"] == prompt + ids(tok, " 1 3") + [EOS]
    assert out.features["rejected_input_ids"] == prompt + ids(tok, " 3 1") + [EOS]
    assert out.features["chosen_labels"] == [-100] * len(prompt) + ids(tok, " 1 3") + [EOS]
    assert out.features["prompt_input_ids"] == prompt
    assert not out.truncated


def test_no_double_bos_or_eos(tok):
    out = formatter(tok).format({"prompt": "<s>sort: 1 =", "chosen": " 1</s>", "rejected": " 2"})
    assert out.features["chosen_input_ids"].count(BOS) == 1
    assert out.features["chosen_input_ids"][-2:] != [EOS, EOS]
    assert out.features["chosen_input_ids"] == [BOS] + ids(tok, "sort: 1 =") + ids(tok, " 1") + [EOS]


def test_tokenizer_without_bos_gets_none(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    out = formatter(no_bos).format({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"})
    assert out.features["chosen_input_ids"] == ids(tok, "sort: 3 1 =") + ids(tok, " 1 3") + [EOS]


def test_last_prompt_token_merged_with_answer_goes_to_the_answer(tok):
    # "sort: " ends in the token "Ġ", which merges with "1" into "Ġ1" when the answer follows.
    assert ids(tok, "sort: ") == ids(tok, "sort:") + ids(tok, " ")
    out = formatter(tok).format({"prompt": "sort: ", "chosen": "1 2", "rejected": "2 1"})
    assert out.features["chosen_input_ids"] == [BOS] + ids(tok, "sort:") + ids(tok, " 1 2") + [EOS]
    assert out.features["chosen_labels"] == [-100] * (1 + len(ids(tok, "sort:"))) + ids(tok, " 1 2") + [EOS]


def test_two_prompt_tokens_merging_into_one_follow_the_same_rule(tok):
    # "The sky i" -> ... "Ġ" "i"; with "s blue" -> ... "Ġis": the rule moves the split back by one token only.
    full = ids(tok, "The sky is blue")
    split = len(ids(tok, "The sky i")) - 1
    out = formatter(tok).format({"prompt": "The sky i", "chosen": "s blue", "rejected": "s green"})
    assert out.features["chosen_input_ids"] == [BOS] + full + [EOS]
    assert out.features["chosen_labels"] == [-100] * (1 + split) + full[split:] + [EOS]


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
    ("abc", "abcdef", ("ab", "c", "cdef")),
    ("xyz", "abc", ("", "xyz", "abc")),
    (["m1", "m2"], ["m1", "m3"], (["m1"], ["m2"], ["m3"])),
])
def test_implicit_prompt_extraction(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected


def test_implicit_prompt_through_format(tok):
    implicit = formatter(tok).format({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    explicit = formatter(tok).format({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    assert implicit.features == explicit.features


def test_conversational_explicit_prompt(tok):
    row = {"prompt": [chat("user", "sort: 2 1")], "chosen": [chat("assistant", "1 2")],
           "rejected": [chat("assistant", "2 1")]}
    out = formatter(tok).format(row)
    prompt_text = "<|user|>\nsort: 2 1<|end|>\n<|assistant|>\n"
    expected_prompt = [BOS] + ids(tok, prompt_text)
    assert out.features["chosen_input_ids"] == expected_prompt + ids(tok, "1 2<|end|>\n") + [EOS]
    assert out.features["rejected_labels"][len(expected_prompt):] == ids(tok, "2 1<|end|>\n") + [EOS]


def test_conversational_implicit_and_string_prompt_beside_conversation(tok):
    implicit = {"chosen": [chat("user", "sort: 2 1"), chat("assistant", "1 2")],
                "rejected": [chat("user", "sort: 2 1"), chat("assistant", "2 1")]}
    explicit = {"prompt": [chat("user", "sort: 2 1")], "chosen": [chat("assistant", "1 2")],
                "rejected": [chat("assistant", "2 1")]}
    f = formatter(tok)
    assert f.format(implicit).features == f.format(explicit).features
    # A string prompt beside conversational answers is refused (issue 20: it was silently ignored).
    with pytest.raises(DataError, match="'prompt' is a string but 'chosen' a conversation"):
        f.format({"prompt": "ignored", **implicit})


def test_prompt_ending_with_assistant_continues_the_message(tok):
    row = {"prompt": [chat("user", "sort: 2 1"), chat("assistant", "1")], "chosen": [chat("assistant", " 2")],
           "rejected": [chat("assistant", " 1")]}
    prompt, chosen, _ = formatter(tok).texts(row)
    assert prompt == "<|user|>\nsort: 2 1<|end|>\n<|assistant|>\n1"


def test_template_rendering_the_prompt_differently_alone(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:\n{% endif %}")
    row = {"prompt": [chat("user", "hi")], "chosen": [chat("assistant", "yes")], "rejected": [chat("assistant", "no")]}
    # alone: "user: hi\nassistant:\n"; in the conversation: "user: hi\nassistant: yes\n"
    # -> shared "user: hi\nassistant:"
    assert formatter(odd).texts(row) == ("user: hi\nassistant:", " yes\n", " no\n")


def test_truncation_keep_end_and_keep_start(tok):
    row = {"prompt": "sort: 1 2 3 4 5 6 =", "chosen": " 1 2 3", "rejected": " 3 2 1"}
    prompt = [BOS] + ids(tok, "sort: 1 2 3 4 5 6 =")  # 10 tokens
    answer = ids(tok, " 1 2 3") + [EOS]  # 4 tokens
    assert (len(prompt), len(answer)) == (10, 4)
    end = formatter(tok, max_length=12, max_prompt_length=5).format(row)
    assert end.truncated and end.features["chosen_input_ids"] == prompt[-5:] + answer
    start = formatter(tok, max_length=12, max_prompt_length=5, truncation_mode="keep_start").format(row)
    assert start.features["chosen_input_ids"] == prompt[:5] + answer
    # Still too long after the prompt cut: answers are cut to max_length - max_prompt_length (the EOS goes).
    both = formatter(tok, max_length=8, max_prompt_length=5).format(row)
    assert both.features["chosen_input_ids"] == prompt[-5:] + answer[:3]
    assert both.features["chosen_labels"] == [-100] * 5 + answer[:3]
    fits = formatter(tok, max_length=14, max_prompt_length=5).format(row)
    assert not fits.truncated and fits.features["chosen_input_ids"] == prompt + answer


def test_longer_answer_decides_truncation_for_both(tok):
    row = {"prompt": "sort: 1 2 =", "chosen": " 1", "rejected": " 2 1 2 1 2 1"}
    prompt = [BOS] + ids(tok, "sort: 1 2 =")  # 6 tokens; longer answer 7 with EOS
    out = formatter(tok, max_length=12, max_prompt_length=4).format(row)
    assert out.features["chosen_input_ids"] == prompt[-4:] + ids(tok, " 1") + [EOS]


def test_collate_pads_chosen_then_rejected(tok):
    f = formatter(tok)
    feats = [f.format({"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1 1 1"}).features,
             f.format({"prompt": "sort: 2 =", "chosen": " 2", "rejected": " 2 2"}).features]
    batch = f.collate(feats)
    rows = [feats[0]["chosen_input_ids"], feats[1]["chosen_input_ids"],
            feats[0]["rejected_input_ids"], feats[1]["rejected_input_ids"]]
    width = max(map(len, rows))
    assert batch["input_ids"].shape == (4, width)
    for i, row in enumerate(rows):
        assert batch["input_ids"][i].tolist() == row + [PAD] * (width - len(row))
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (width - len(row))
    assert batch["labels"][3].tolist()[-1] == -100
    custom = formatter(tok, padding_value=7, label_pad_token_id=-1).collate(feats)
    assert custom["input_ids"][1, -1] == 7 and custom["labels"][1, -1] == -1


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "rejected": "r"}, "missing column 'chosen'"),
    ({"prompt": "p", "chosen": ["a", "b"], "rejected": "r"}, "'chosen' must be a string or a list of {role, content}"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' must be a string"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "'rejected' must be a string"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' is an empty string"),
    ({"prompt": 5, "chosen": "c", "rejected": "r"}, "'prompt' is int but 'chosen' a string"),
    ({"prompt": [chat("user", "q")], "chosen": [{"text": "a"}], "rejected": [chat("assistant", "b")]},
     "'chosen' message 0 has no 'role' .it has 'text'."),
    ({"prompt": [chat("user", "q")], "chosen": [chat("assistant", 7)], "rejected": [chat("assistant", "b")]},
     "'chosen' message 0: 'content' must be a string, got int '7'"),
    ({"prompt": [chat("wizard", "q")], "chosen": [chat("assistant", "a")], "rejected": [chat("assistant", "b")]},
     "unknown role 'wizard'"),
])
def test_malformed_rows(tok, row, message):
    with pytest.raises(DataError, match=message.replace("{", r"\{").replace("}", r"\}")):
        formatter(tok).format(row)


def test_prepare_names_the_row_and_counts_truncated_and_dropped(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    rows = [{"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"},
            # no prompt and no BOS: the answers are cut to max_length - max_prompt_length = 1 token, which is
            # the first position and never a target, so nothing is left to score
            {"prompt": "", "chosen": " 1 2 3 4 5 6 7", "rejected": " 1"},
            {"prompt": "sort: 1 2 3 4 5 6 =", "chosen": " 1 2 3", "rejected": " 3 2 1"}]
    ds, report = prepare(datasets.Dataset.from_list(rows), formatter(no_bos, max_length=6, max_prompt_length=5), "t")
    assert (report.kept, report.truncated, report.dropped) == (2, 2, 1)
    assert len(ds) == 2 and "__alignkit_truncated" not in ds.column_names
    bad = datasets.Dataset.from_list(rows + [{"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(DataError, match=r"^pairs.jsonl, row 3: 'chosen' is an empty string$"):
        prepare(bad, formatter(tok), "pairs.jsonl")


def test_every_row_dropped_is_an_error(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    ds = datasets.Dataset.from_list([{"prompt": "", "chosen": " 1 2 3 4 5 6 7", "rejected": " 1"}] * 3)
    with pytest.raises(DataError, match="every one of the 3 examples was dropped"):
        prepare(ds, formatter(no_bos, max_length=6, max_prompt_length=5), "t")


def test_dataset_num_proc_gives_the_same_features(tok):
    rows = [{"prompt": f"sort: {i} {i + 1} =", "chosen": f" {i} {i + 1}", "rejected": f" {i + 1} {i}"}
            for i in range(40)]
    ds = datasets.Dataset.from_list(rows)
    one, _ = prepare(ds, formatter(tok), "t")
    two, report = prepare(ds, formatter(tok, dataset_num_proc=2), "t")
    assert one.to_list() == two.to_list() and report.kept == 40


class CountingFormatter(PreferenceFormatter):
    rows_formatted = 0

    def format_batch(self, examples):
        CountingFormatter.rows_formatted += len(examples)
        return super().format_batch(examples)


def test_formatted_data_is_cached_between_runs(tok, tmp_path, monkeypatch):
    """A second prepare() of the same file with the same settings reads datasets' cache; other settings or
    another tokenizer format again."""
    from alignkit.engine.data import load_data

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(f'{{"prompt": "sort: {i} 1 =", "chosen": " 1 {i}", "rejected": " {i} 1"}}\n'
                            for i in range(30)))

    def run(tokenizer=tok, **cfg):
        before = CountingFormatter.rows_formatted
        ds, _ = prepare(load_data(str(path), "train"), CountingFormatter(ORPOMethodConfig(**cfg), tokenizer), "t")
        return CountingFormatter.rows_formatted - before, ds.to_list()

    first, features = run()
    assert first == 30
    assert run() == (0, features)
    assert run(max_length=8, max_prompt_length=4)[0] == 30
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    assert run(no_bos)[0] == 30
    assert run() == (0, features)
