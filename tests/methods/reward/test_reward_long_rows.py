"""A huge answer is dropped (longer than max_length) without ever being tokenized whole: memory stays bounded."""

from types import SimpleNamespace

import pytest
from alignkit_reward import RewardFormatter

from alignkit import DropExample
from helpers import chat


class Recording:
    """The tokenizer, recording the longest text it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        self.longest = max([self.longest, *map(len, texts)])
        return self.tok(text, *args, **kwargs)

    def apply_chat_template(self, messages, tokenize=True, **kwargs):
        if tokenize:
            self.longest = max([self.longest, *(len(m["content"]) for m in messages)])
        return self.tok.apply_chat_template(messages, tokenize=tokenize, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("conversational", [False, True])
def test_a_huge_answer_is_dropped_without_encoding_it(tok, conversational):
    recording = Recording(tok)
    f = RewardFormatter(SimpleNamespace(max_length=64, dataset_num_proc=None), recording)
    huge = " 1" * 2_000_000
    row = {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": huge}
    if conversational:
        row = {"prompt": [chat("user", "sort: 3 1")], "chosen": [chat("assistant", "1 3")],
               "rejected": [chat("assistant", huge)]}
    with pytest.raises(DropExample, match="longer than method.max_length=64"):
        f.format(row)
    assert recording.longest < 10_000
    assert f.format({**row, "rejected": row["chosen"]}).features  # a short pair is kept
