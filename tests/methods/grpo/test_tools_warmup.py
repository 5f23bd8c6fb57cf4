"""The tools demo's warm-up teaches the final answer to copy the tool's result (issue 24 item 4): assistant turns
marked `"train": False` are context only, a tuple of episode lists is a curriculum, and the calculator's worked
episodes start with copy drills."""

import random

import pytest

from alignkit.blocks import demo
from alignkit.blocks.demo import conversation_labels, sft_warmup_conversations
from alignkit.online.calculator import CalculatorEnvironment, arithmetic_rows, copy_drills, demonstration
from alignkit.testing import tiny_model, tiny_tokenizer

EPISODE = [{"role": "user", "content": "what is 16*44?"},
           {"role": "assistant", "content": '<tool_call>{"name":"calculate","arguments":{"expression":"16*44"}}'
                                            '</tool_call>'},
           {"role": "tool", "name": "calculate", "content": "704"},
           {"role": "assistant", "content": "704"}]


def trained_text(tok, messages):
    ids, labels = conversation_labels(tok, messages)
    assert len(ids) == len(labels)
    return tok.decode([t for t in labels if t != -100])


def test_every_assistant_turn_is_trained_by_default(tok):
    assert trained_text(tok, EPISODE) == EPISODE[1]["content"] + "<|end|>\n704<|end|>\n"


def test_an_assistant_turn_marked_train_false_is_context_only(tok):
    messages = [EPISODE[0], {**EPISODE[1], "train": False}, *EPISODE[2:]]
    assert trained_text(tok, messages) == "704<|end|>\n"
    ids, _ = conversation_labels(tok, messages)
    assert ids == conversation_labels(tok, EPISODE)[0]  # the same tokens: only the labels change


def test_a_tuple_of_episode_lists_is_trained_stage_by_stage(monkeypatch, tok):
    seen = []
    monkeypatch.setattr(demo, "_sft_on_conversations",
                        lambda model, tokenizer, stage, steps, *rest: seen.append((stage[0][0]["content"], steps)))
    first, second = [[{"role": "user", "content": "a"}]], [[{"role": "user", "content": "b"}]]
    sft_warmup_conversations(None, tok, (first, second), 7)
    assert seen == [("a", 4), ("b", 3)]
    seen.clear()
    sft_warmup_conversations(None, tok, first + second, 5)
    assert seen == [("a", 5)]


def test_the_calculators_warm_up_first_calls_the_tool_every_time_then_keeps_drilling_the_copy(tok):
    tool_first, mix = CalculatorEnvironment.demonstrations()
    assert len(tool_first) == len(arithmetic_rows("train"))
    for user, call, result, answer in tool_first[:20]:  # both turns trained: the call and the copied result
        expression = user["content"].removeprefix("what is ").removesuffix("?")
        assert f'"expression":"{expression}"' in call["content"] and answer["content"] == result["content"]
        trained = f"{call['content']}<|end|>\n{answer['content']}<|end|>\n"
        assert trained_text(tok, [user, call, result, answer]) == trained
    drills = copy_drills()
    assert all(d in mix for d in drills[:20]) and len(mix) == len(drills) + len(arithmetic_rows("train"))
    for user, call, result, answer in drills[:20]:  # the answer alone is trained
        assert call["train"] is False and answer["content"] == result["content"]
        assert trained_text(tok, [user, call, result, answer]) == answer["content"] + "<|end|>\n"
    test_prompts = {r["prompt"] for r in arithmetic_rows("test")}
    assert not {e[0]["content"] for e in tool_first + mix} & test_prompts


@pytest.mark.slow
def test_after_the_warm_up_the_answer_copies_the_tool_result():
    """The defect: after the old warm-up (300 steps on the mix alone) no held-out answer copied the tool's result
    (exact-match 0 with the right result in context). After the curriculum most do."""
    import torch

    tok, model = tiny_tokenizer(), tiny_model(0)
    with torch.random.fork_rng():
        sft_warmup_conversations(model, tok, CalculatorEnvironment.demonstrations(), 900)
    model.eval()
    end, right = tok.convert_tokens_to_ids("<|end|>"), 0
    rows = arithmetic_rows("test")[:50]
    for row in rows:
        context = demonstration(row, True, random.Random(0))[:3]
        ids = tok.apply_chat_template(context, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=8, do_sample=False, eos_token_id=end,
                             pad_token_id=tok.pad_token_id)
        right += tok.decode(out[0, len(ids):], skip_special_tokens=True).strip() == row["answer"]
    assert right / len(rows) > 0.5, right
