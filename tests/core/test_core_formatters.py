"""The core's formatters: ids and labels equal what TRL 1.16 prepares (run for real), unpairing, KL pairs,
prompt-only pass-through, packing, registration and one-line errors."""

import copy
import tempfile

import datasets
import pytest
import torch

from alignkit import DataError, DropExample
from alignkit.formatters import (
    LanguageModelingFormatter,
    PromptCompletionFormatter,
    PromptOnlyFormatter,
    SequenceFormatter,
    UnpairedPreferenceFormatter,
)
from alignkit.plugins import build_registry
from alignkit.testing import plugin_manager, tiny_model
from helpers import chat


def make(cls, tok, **cfg):
    return cls(cls.config_class(name="t", **cfg), tok)


def formatted(formatter, rows):
    out = []
    for result in formatter.format_batch(rows):
        if isinstance(result, DataError):
            raise result
        if not isinstance(result, DropExample):
            out += result if isinstance(result, list) else [result]
    return [r.features for r in out]


LONG = " ".join(str(i % 10) for i in range(30))
STANDARD_PC = [{"prompt": "sort: 3 1 =", "completion": " 1 3"}, {"prompt": "sort: ", "completion": "1 2"},
               {"prompt": f"sort: {LONG} =", "completion": " 0 0 1"}, {"prompt": "a", "completion": f" {LONG}</s>"}]
CONV_PC = [{"prompt": [chat("user", "sort: 2 1")], "completion": [chat("assistant", "1 2")]},
           {"prompt": [chat("system", "be brief"), chat("user", f"sort: {LONG}")],
            "completion": [chat("assistant", LONG)]},
           {"prompt": [chat("user", "sort: 2 1"), chat("assistant", "1")], "completion": [chat("assistant", " 2")]}]
STANDARD_LM = [{"text": "hello world"}, {"text": f"sort: {LONG}"}, {"text": "ends</s>"}]
CONV_LM = [{"messages": r["prompt"] + r["completion"]} for r in CONV_PC]


def trl_sft(tok, rows, **cfg):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, **cfg)
    trainer = SFTTrainer(model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


@pytest.mark.parametrize("rows", [STANDARD_PC, CONV_PC, STANDARD_LM, CONV_LM], ids=["pc", "pc-chat", "lm", "lm-chat"])
@pytest.mark.parametrize("cfg", [{"max_length": 12}, {"max_length": 12, "truncation_mode": "keep_end"},
                                 {"max_length": 64, "completion_only_loss": False}], ids=["start", "end", "full"])
def test_ids_and_labels_equal_trl_sft(tok, rows, cfg):
    ours = formatted(make(SequenceFormatter, tok, **cfg), rows)
    assert ours == trl_sft(tok, rows, **cfg)


def test_assistant_only_loss_equals_trl_with_generation_markers(tok):
    """The built-in template marks assistant turns with {% generation %}: TRL reads them the same way."""
    assert "{% generation %}" in tok.chat_template
    ours = formatted(make(SequenceFormatter, tok, assistant_only_loss=True, max_length=64), CONV_LM + CONV_PC)
    assert ours == trl_sft(tok, CONV_LM, assistant_only_loss=True, max_length=64) + \
        trl_sft(tok, CONV_PC, assistant_only_loss=True, max_length=64)
    # A template without markers: the turns are found by rendering, and the same tokens are trained.
    unmarked = copy.deepcopy(tok)
    unmarked.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert formatted(make(SequenceFormatter, unmarked, assistant_only_loss=True, max_length=64),
                     CONV_LM + CONV_PC) == ours
    assert any(-100 in r["labels"] and set(r["labels"]) != {-100} for r in ours)


def test_unpaired_equals_trl_kto_tokenization_and_kl_rotation(tok):
    from trl import KTOConfig, KTOTrainer

    paired = [{"prompt": f"sort: {i} 1 =", "chosen": f" 1 {i}", "rejected": f" {i} 1 1"} for i in range(5)]
    args = KTOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, max_length=64,
                     per_device_train_batch_size=4)
    trainer = KTOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args,
                         train_dataset=datasets.Dataset.from_list(paired), processing_class=tok)
    ours = formatted(make(UnpairedPreferenceFormatter, tok, max_length=64, kl_group_size=4), paired)
    theirs = trainer.train_dataset.to_list()
    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs):
        assert a["label"] == b["label"]
        assert a["prompt_input_ids"] == b["prompt_ids"]
        assert a["completion_input_ids"] == b["prompt_ids"] + b["completion_ids"]
        assert a["completion_labels"] == [-100] * len(b["prompt_ids"]) + b["completion_ids"]
        assert a["KL_completion_input_ids"] == b["prompt_ids"] + b["KL_completion_ids"]


def test_unpaired_rows_and_kl_rotation_within_groups(tok):
    rows = [{"prompt": "p =", "completion": f" {i}", "label": i % 2 == 0} for i in range(5)]
    out = formatted(make(UnpairedPreferenceFormatter, tok, kl_group_size=2), rows)
    completions = [r["completion_input_ids"][len(r["prompt_input_ids"]):] for r in out]
    kl = [r["KL_completion_input_ids"][len(r["prompt_input_ids"]):] for r in out]
    assert kl == [completions[1], completions[0], completions[3], completions[2], completions[4]]
    assert [r["label"] for r in out] == [True, False, True, False, True]
    batch = make(UnpairedPreferenceFormatter, tok).collate(out[:2])
    assert batch["label"].tolist() == [True, False] and batch["KL_input_ids"].shape[0] == 2
    assert (batch["labels"][0] == -100).sum() == (len(out[0]["prompt_input_ids"]) + batch["labels"].shape[1]
                                                  - len(out[0]["completion_labels"]))


def test_implicit_prompt_paired_rows_are_unpaired(tok):
    f = make(UnpairedPreferenceFormatter, tok)
    implicit = formatted(f, [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    explicit = formatted(f, [{"prompt": "The sky is", "completion": " blue.", "label": True},
                             {"prompt": "The sky is", "completion": " green.", "label": False}])
    assert [r["completion_input_ids"] for r in implicit] == [r["completion_input_ids"] for r in explicit]


def test_prompt_only_keeps_every_column(tok):
    f = make(PromptOnlyFormatter, tok, max_length=4)
    out = f.format({"prompt": [chat("user", "sort: 2 1")], "answer": "1 2", "id": 7})
    assert out.features["answer"] == "1 2" and out.features["id"] == 7
    full = tok.apply_chat_template([chat("user", "sort: 2 1")], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
    assert out.truncated and out.features["prompt_input_ids"] == full[-4:]
    assert make(PromptOnlyFormatter, tok).format({"prompt": "sort: 1 2"}).features["prompt_input_ids"] == \
        tok("sort: 1 2")["input_ids"]
    batch = f.collate([out.features, f.format({"prompt": "x", "answer": "y", "id": 8}).features])
    assert batch["answer"] == ["1 2", "y"] and batch["prompt_attention_mask"][1].tolist() == [1, 0, 0, 0]


def test_packing_rows_positions_and_first_labels(tok):
    f = make(SequenceFormatter, tok, packing=True, max_length=12)
    rows = [{"text": "a b c"}, {"text": "hello world"}, {"text": "x"}, {"text": "zz top"}]
    singles = formatted(make(SequenceFormatter, tok, max_length=12), rows)
    packed = formatted(f, rows)
    assert all(len(p["input_ids"]) <= 12 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(s["input_ids"]) for s in singles)
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][i] == -100 for i in starts)
    batch = f.collate(packed)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_packed_example_loss_equals_unpacked(tok):
    """sdpa with position_ids and no attention mask: no attention or position leakage between packed examples."""
    model = tiny_model(seed=1, attn_implementation="sdpa").double()
    rows = [{"text": "sort: 3 1 2 = 1 2 3"}, {"text": "hello world"}, {"text": "x y"}]
    packed_f, plain_f = make(SequenceFormatter, tok, packing=True, max_length=64), make(SequenceFormatter, tok)

    def loss_sum(batch):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**kwargs, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="sum")

    packed = formatted(packed_f, rows)
    assert len(packed) == 1
    plain = sum(loss_sum(plain_f.collate([r])) for r in formatted(plain_f, rows))
    assert loss_sum(packed_f.collate(packed)).item() == pytest.approx(plain.item(), rel=1e-12)


def test_core_plugin_registers_the_formatters_without_naming_a_method():
    registry = build_registry(plugin_manager())
    assert {"language-modeling", "prompt-completion", "unpaired-preference", "prompt-only"} <= set(registry.formatters)
    assert registry.methods == {}


@pytest.mark.parametrize("cls, row, message", [
    (LanguageModelingFormatter, {"prompt": "p", "completion": "c"},
     "expected columns 'text' or 'messages'; the row has 'prompt', 'completion'"),
    (PromptCompletionFormatter, {"text": "t"}, "expected columns 'prompt' and 'completion'; the row has 'text'"),
    (PromptCompletionFormatter, {"prompt": "p"}, "missing column 'completion'"),
    (PromptCompletionFormatter, {"prompt": "p", "completion": 3}, "'completion' must be a string or a list of"),
    (PromptCompletionFormatter, {"prompt": "p", "completion": [chat("assistant", "c")]},
     "'prompt' and 'completion' must both be strings or both be conversations"),
    (LanguageModelingFormatter, {"text": ""}, "'text' is an empty string"),
    (LanguageModelingFormatter, {"messages": [chat("wizard", "x")]}, "'messages' message 0 has unknown role 'wizard'"),
    (UnpairedPreferenceFormatter, {"prompt": "p", "completion": "c"}, "missing column 'label'"),
    (UnpairedPreferenceFormatter, {"prompt": "p", "completion": "c", "label": "yes"},
     "'label' must be true or false, got 'yes'"),
    (UnpairedPreferenceFormatter, {"prompt": "p", "chosen": "c"}, "missing column 'rejected'"),
    (PromptOnlyFormatter, {"question": "q"}, "missing column 'prompt'; prompt-only data needs a 'prompt' column"),
])
def test_bad_rows_get_one_line_errors(tok, cls, row, message):
    with pytest.raises(DataError) as e:
        make(cls, tok).format(row)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_packing_through_prepare_counts_no_row_as_dropped(tok):
    from alignkit.engine.data import prepare

    rows = [{"text": f"sort: {i} {i + 1}"} for i in range(10)]
    ds, report = prepare(datasets.Dataset.from_list(rows), make(SequenceFormatter, tok, packing=True, max_length=40),
                         "t")
    assert report.dropped == 0 and report.kept == len(ds) < 10
    assert sorted(i for row in ds["input_ids"] for i in row) == \
        sorted(i for r in formatted(make(SequenceFormatter, tok), rows) for i in r["input_ids"])


def test_formatter_fingerprint_covers_the_blocks_it_uses():
    """Editing alignkit.blocks.text or alignkit.blocks.tokens changes every formatter's cache key."""
    import inspect

    import alignkit.blocks.text
    import alignkit.blocks.tokens
    from alignkit.plugin.formatter import class_sources
    from alignkit_orpo import PreferenceFormatter

    for cls in (SequenceFormatter, UnpairedPreferenceFormatter, PromptOnlyFormatter, PreferenceFormatter):
        sources = class_sources(cls)
        assert (inspect.getsource(alignkit.blocks.tokens) in sources
                and inspect.getsource(alignkit.blocks.text) in sources)


def test_unpaired_order_follows_trl_when_a_chosen_example_is_dropped(tok):
    """A paired row whose chosen side is dropped keeps its rejected example among the rejected ones (TRL's order:
    all chosen, then all rejected)."""
    prompt = "sort: 1 2 3 "  # ends with a space token, which merges with the rejected answer's "9"
    n = len(tok(prompt)["input_ids"])
    rows = [{"prompt": prompt, "chosen": " 9", "rejected": "9"}, {"prompt": "p =", "chosen": " a", "rejected": " b"}]
    out = formatted(make(UnpairedPreferenceFormatter, tok, max_length=n), rows)
    # row 0's chosen (its whole prompt fills max_length) is dropped
    assert [r["label"] for r in out] == [True, False, False]
    assert out[1]["completion_input_ids"][:n - 1] == tok(prompt)["input_ids"][:n - 1]
    kl = [r["KL_completion_input_ids"][len(r["prompt_input_ids"]):] for r in out]
    completions = [r["completion_input_ids"][len(r["prompt_input_ids"]):] for r in out]
    assert kl[0] == completions[2][:len(kl[0])]
