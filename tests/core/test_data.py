"""Loading data from every supported source, and the errors for missing or malformed data."""

import json

import datasets
import pytest
import torch

from alignkit import DataError
from alignkit.engine.data import EpochSampler, load_data, load_splits

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_files(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    ds = datasets.Dataset.from_list(ROWS)
    {".jsonl": lambda: ds.to_json(path, lines=True), ".json": lambda: path.write_text(json.dumps(ROWS)),
     ".parquet": lambda: ds.to_parquet(path), ".csv": lambda: ds.to_csv(path, index=False)}[suffix]()
    assert load_data(str(path), "train").to_list() == ROWS


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    assert len(load_data(str(tmp_path / "ds"), "ignored")) == 10
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]),
                          "test": datasets.Dataset.from_list(ROWS[6:])}).save_to_disk(tmp_path / "dd")
    assert len(load_data(str(tmp_path / "dd"), "test")) == 4
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_data(str(tmp_path / "dd"), "validation")


def test_builtin_sets_do_not_overlap():
    train, test = load_data("builtin:sort", "train"), load_data("builtin:sort", "test")
    assert len(train) == 2000 and len(test) == 200
    assert not set(train["prompt"]) & set(test["prompt"])
    chat = load_data("builtin:sort-chat", "train")[0]
    assert chat["prompt"][0]["role"] == "user" and chat["chosen"][0]["role"] == "assistant"
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:nope'"):
        load_data("builtin:nope", "train")


def test_eval_fraction_holds_out_with_the_seed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    train, held = load_splits(str(path), "train", None, "test", 0.2, seed=1)
    train2, held2 = load_splits(str(path), "train", None, "test", 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8 and held.to_list() == held2.to_list()
    assert not {r["prompt"] for r in held.to_list()} & {r["prompt"] for r in train.to_list()}


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_data(str(path), "train")
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: each line must be a JSON object, got list"):
        load_data(str(path), "train")


@pytest.mark.parametrize("spec, message", [
    ("missing.jsonl", "missing.jsonl: no such file"),
    ("data.txt", "data.txt: unsupported file type"),
    ("nothing_here", "nothing_here: no such file or directory"),
])
def test_missing_and_unsupported(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=message):
        load_data(spec, "train")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_data(str(path), "train")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError,
                       match="someone/some-dataset: no such local file or folder, and it cannot be loaded from the "
                       "Hugging Face hub"):
        load_data("someone/some-dataset", "train")


def test_length_grouped_shuffle_is_seeded_and_pads_less():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1000,), generator=g).tolist()
    sampler = EpochSampler(len(lengths), seed=7, lengths=lengths, batch_size=4, group=10)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every example once
    assert list(EpochSampler(len(lengths), seed=7, lengths=lengths, batch_size=4, group=10)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert lengths[order[0]] == max(lengths)  # the longest batch first

    def padding(order):  # padded slots of micro-batches of 4 taken in this order
        batches = [[lengths[i] for i in order[s:s + 4]] for s in range(0, len(order), 4)]
        return sum(len(b) * max(b) - sum(b) for b in batches)

    plain = list(EpochSampler(len(lengths), seed=7))
    assert padding(order) < padding(plain) / 5
