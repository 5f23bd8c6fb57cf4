"""The public text and token blocks: rendering and splitting, the merge and common-prefix rules, BOS/EOS,
truncation, label masking, and bounded encoding of huge texts with exactly the ids of the whole text."""

import copy
import random

import pytest

from alignkit import DataError
from alignkit.blocks.text import check_messages, column, common_prefix, render_prompt, render_split
from alignkit.blocks.tokens import (
    Encoder,
    labels_where,
    masked_labels,
    max_chars_per_token,
    split_common,
    split_merged,
    truncate,
    truncate_pair,
    with_bos,
    with_eos,
)
from helpers import chat


def test_render_split_uses_generation_prompt_and_continuation(tok):
    prompt, (c,) = render_split(tok, [chat("user", "hi")], [chat("assistant", "yo")])
    assert (prompt, c) == ("<|user|>\nhi<|end|>\n<|assistant|>\n", "yo<|end|>\n")
    assert render_prompt(tok, [chat("user", "hi"), chat("assistant", "y")]) == "<|user|>\nhi<|end|>\n<|assistant|>\ny"
    with pytest.raises(DataError, match="the prompt's last message must be from 'user' or 'assistant', not 'system'"):
        render_prompt(tok, [chat("system", "s")])


def test_render_split_common_prefix_rule(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:\n{% endif %}")
    assert render_split(odd, [chat("user", "hi")], [chat("assistant", "yes")], [chat("assistant", "no")]) == \
        ("user: hi\nassistant:", [" yes\n", " no\n"])


def test_no_chat_template_is_a_one_line_error(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        render_split(bare, [chat("user", "hi")], [chat("assistant", "yo")])


def test_message_and_column_checks():
    with pytest.raises(DataError, match=r"^'m' message 1 has no 'role' \(it has 'text'\)$"):
        check_messages("m", [chat("user", "x"), {"text": "y"}])
    with pytest.raises(DataError, match=r"^'m' message 0: 'content' must be a string, got int '7'$"):
        check_messages("m", [chat("user", 7)])
    with pytest.raises(DataError, match="^missing column 'prompt'; needs it; the row has no columns$"):
        column({}, "prompt", "needs it")
    assert column({"p": [chat("user", "x")]}, "p") == [chat("user", "x")]


def test_common_prefix_on_strings_and_lists():
    assert common_prefix("abcd", "abxd", "abcc") == "ab"
    assert common_prefix([1, 2, 3], [1, 2]) == [1, 2]
    assert common_prefix("same", "same") == "same"
    assert common_prefix("", "x") == ""


def test_split_rules():
    # merge rule (ORPO): one merged last prompt token moves to the completion
    assert split_merged([1, 2, 3], [1, 2, 9, 4]) == ([1, 2], [9, 4])
    assert split_merged([1, 2], [1, 2, 4]) == ([1, 2], [4])
    # common-prefix rule (TRL 1.x SFT/KTO): split where the ids diverge, however early
    assert split_common([1, 7, 3], [1, 2, 9, 4]) == ([1], [2, 9, 4])


def test_bos_eos_truncation_and_labels():
    assert with_bos([5], 1) == [1, 5] and with_bos([1, 5], 1) == [1, 5] and with_bos([5], None) == [5]
    assert with_eos([5], 2) == [5, 2] and with_eos([5, 2], 2) == [5, 2] and with_eos([], 2) == [2]
    assert truncate([1, 2, 3], 2) == ([1, 2], True) and truncate([1, 2, 3], 2, "keep_end") == ([2, 3], True)
    assert truncate([1, 2], 2) == ([1, 2], False) and truncate([1, 2], None) == ([1, 2], False)
    prompts, completions, cut = truncate_pair([[1] * 6, [1] * 6], [[2] * 3, [3] * 7], 10, 4, "keep_end")
    assert cut and prompts == [[1] * 4] * 2 and completions == [[2] * 3, [3] * 6]
    assert masked_labels(2, [1, 2, 3], -100) == [-100, -100, 3]
    assert labels_where([1, 2, 3], [0, 1, 0], -1) == [-1, 2, -1]


def test_max_chars_per_token_bounds_every_token(tok):
    bound = max_chars_per_token(tok)
    assert all(len(tok.decode([i])) <= bound for i in range(len(tok)))


def huge_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["sort:", "1", "22", "333", "the", "sky", "is", "blue.", "héllo", "wörld", "\n", "<|end|>", "  "]
    return " ".join(rng.choice(words) for _ in range(n_words))


@pytest.mark.parametrize("special", [False, True])
def test_bounded_texts_give_the_whole_texts_ids_at_both_ends(tok, special):
    encoder = Encoder(tok, keep=40, add_special_tokens=special)
    for seed in range(5):
        text = huge_text(3000, seed)
        assert encoder.is_long(text)
        whole = tok(text, add_special_tokens=special)["input_ids"]
        stand_in = encoder.texts([text])[0]
        assert stand_in[:40] == whole[:40] and stand_in[-40:] == whole[-40:] and len(stand_in) == 80
        for n in (1, 17, 39):
            assert truncate(stand_in, n)[0] == truncate(whole, n)[0]
            assert truncate(stand_in, n, "keep_end")[0] == truncate(whole, n, "keep_end")[0]
    assert encoder.texts(["short text"])[0] == tok("short text", add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("split", [split_merged, split_common])
def test_bounded_pairs_equal_the_unbounded_path_after_truncation(tok, split):
    bounded, whole = Encoder(tok, keep=30), Encoder(tok)
    cases = [(huge_text(2000, 1), " 1 22 333"), ("sort: ", huge_text(2000, 2)),
             (huge_text(2000, 3), huge_text(2000, 4)),
             (huge_text(2000, 5) + " 1", "1 22 sky")]  # a merge across the boundary
    for prompt, completion in cases:
        (p, c), = bounded.pairs([(prompt, completion)], split=split)
        (wp, wc), = whole.pairs([(prompt, completion)], split=split)
        for n in (1, 10, 29):
            for mode in ("keep_start", "keep_end"):
                assert truncate(p, n, mode)[0] == truncate(wp, n, mode)[0]
                assert truncate(c, n, mode)[0] == truncate(wc, n, mode)[0]
            assert truncate(p + c, n, "keep_end")[0] == truncate(wp + wc, n, "keep_end")[0]
            assert truncate(p + c, n)[0] == truncate(wp + wc, n)[0]


def test_bounded_encoding_never_encodes_the_whole_huge_text(tok, monkeypatch):
    encoder = Encoder(tok, keep=50)
    seen = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda strings: seen.extend(map(len, strings)) or real(strings))
    text = huge_text(200_000)
    encoder.texts([text])
    encoder.pairs([(text, text)])
    assert max(seen) <= 4 * encoder.window < len(text) / 10
