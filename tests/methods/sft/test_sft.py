"""The SFT plugin (plugins/alignkit-sft): its loss against a float64 reference, packing without leakage,
label masking (completion-only, assistant-only) as the SFT method sees it through the core's SequenceFormatter,
and one-line errors for bad settings and rows."""

import pytest
import torch
from alignkit_sft import SFTConfig, SFTLoss

import alignkit
from alignkit.formatters import SequenceFormatter
from alignkit.formatters.packing import pack
from alignkit.testing import tiny_model, tiny_tokenizer

ROWS = [{"prompt": "sort: 3 1 2 =", "completion": " 1 2 3"}, {"prompt": "sort: 9 7 =", "completion": " 7 9"},
        {"prompt": "sort: 5 5 1 0 =", "completion": " 0 1 5 5"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, attn_implementation="sdpa").eval()


def formatted(tok, rows, **settings):
    formatter = SequenceFormatter(SFTConfig(**settings), tok)
    return formatter, [formatter.format(r).features for r in rows]


def reference(model, batch):
    """NLL sum, correct count, entropy sum and token count from the model's full logits in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    nll = correct = entropy = n = 0.0
    for i in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][i, t])
            if label == -100:
                continue
            logp = torch.log_softmax(logits[i, t - 1], -1)
            nll -= float(logp[label])
            correct += float(int(logits[i, t - 1].argmax()) == label)
            entropy -= float((logp.exp() * logp).sum())
            n += 1
    return nll, correct, entropy, n


@pytest.mark.parametrize("implementation", ["chunked", "plain"])
def test_loss_and_metrics_match_float64_reference(tok, model, implementation):
    formatter, features = formatted(tok, ROWS + [{"text": "a plain text row"}], completion_only_loss=None)
    batch = formatter.collate(features)
    loss = SFTLoss(SFTConfig(loss_implementation=implementation, logits_chunk_size=3))
    loss.prepare_model(model)
    assert (loss.head is None) == (implementation == "plain")
    nll, correct, entropy, n = reference(model, batch)
    assert loss.counts(batch) == {"tokens": n, "input_tokens": int(batch["attention_mask"].sum())}
    with torch.no_grad():
        out = loss(model, batch)
    assert float(out.terms["tokens"]) == pytest.approx(nll, rel=1e-6)
    assert float(out.normalized({"tokens": n})) == pytest.approx(nll / n, rel=1e-6)
    for name, expected in (("mean_token_accuracy", correct), ("entropy", entropy)):
        total, count = out.metrics[name]
        assert (float(total), float(count)) == pytest.approx((expected, n), rel=1e-6)


@pytest.mark.parametrize("head", ["tied", "untied", "lora-on-head"])
def test_fused_head_gradient_equals_plain(tok, head):
    """The chunked path computes the head's gradients in the forward (alignkit.blocks.fusedhead): over two micro-batches
    whose losses are scaled as the engine scales them (by their step's token count), the gradient of every
    parameter, the loss and the metrics equal the plain path's."""
    import peft

    formatter, features = formatted(tok, ROWS)
    batches = [formatter.collate(features[:2]), formatter.collate(features[2:])]
    results = []
    for implementation in ("chunked", "plain"):
        m = tiny_model(seed=4, tie_word_embeddings=head == "tied")
        if head == "lora-on-head":
            torch.manual_seed(0)
            m = peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                       init_lora_weights=False))
        loss = SFTLoss(SFTConfig(loss_implementation=implementation, logits_chunk_size=4))
        loss.prepare_model(m)
        assert (loss.head is None) == (implementation == "plain")
        tokens = sum(loss.counts(b)["tokens"] for b in batches)
        values = []
        for b in batches:
            out = loss(m, b)
            out.normalized({"tokens": tokens}).backward()
            values += [float(out.terms["tokens"])] + [float(x) for pair in out.metrics.values() for x in pair]
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((values, grads))
    (v_fused, g_fused), (v_plain, g_plain) = results
    assert v_fused == pytest.approx(v_plain, rel=1e-5)
    assert g_fused.keys() == g_plain.keys() and g_fused
    for name in g_plain:
        error = (g_fused[name] - g_plain[name]).norm() / g_plain[name].norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"


def test_packed_example_loss_equals_unpacked(tok, model):
    formatter, features = formatted(tok, ROWS + [{"text": "sort: 4 2 = 2 4"}])
    packed = [row for row, _ in pack(features, 64, -100)]
    assert len(packed) == 1 and packed[0]["position_ids"].count(0) == len(features)
    loss = SFTLoss(SFTConfig(logits_chunk_size=5))
    loss.prepare_model(model)
    one_row = formatter.collate(packed)
    assert "attention_mask" not in one_row
    unpacked = formatter.collate(features)
    assert loss.counts(one_row) == loss.counts(unpacked)
    with torch.no_grad():
        a, b = loss(model, one_row), loss(model, unpacked)
    assert float(a.terms["tokens"]) == pytest.approx(float(b.terms["tokens"]), rel=1e-5)
    for name in ("mean_token_accuracy", "entropy"):
        assert float(a.metrics[name][0]) == pytest.approx(float(b.metrics[name][0]), rel=1e-5)
    # Without restarting positions the same row leaks context across examples: the loss changes.
    leaky = dict(one_row, position_ids=torch.arange(one_row["input_ids"].shape[1])[None])
    with torch.no_grad():
        leaked = float(loss(model, leaky).terms["tokens"])
    assert abs(leaked - float(b.terms["tokens"])) > 1e-5 * abs(float(b.terms["tokens"]))


def test_completion_only_loss_masks_the_prompt(tok):
    prompt_ids = tok(text=ROWS[0]["prompt"])["input_ids"]
    full_ids = tok(text=ROWS[0]["prompt"] + ROWS[0]["completion"] + tok.eos_token)["input_ids"]
    _, (default,) = formatted(tok, ROWS[:1])
    _, (everything,) = formatted(tok, ROWS[:1], completion_only_loss=False)
    assert default["input_ids"] == everything["input_ids"] == full_ids and full_ids[-1] == tok.eos_token_id
    n = len(prompt_ids)
    assert default["labels"] == [-100] * n + full_ids[n:]  # completion (and EOS) only: TRL's default
    assert everything["labels"] == full_ids
    _, (text,) = formatted(tok, [{"text": "abc"}])  # language modeling: every token
    assert text["labels"] == text["input_ids"] == tok(text="abc" + tok.eos_token)["input_ids"]


GENERATION_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
                       "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}\n"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_assistant_only_loss_trains_assistant_turns(tok):
    tok = tiny_tokenizer()
    tok.chat_template = GENERATION_TEMPLATE
    messages = [{"role": "user", "content": "sort: 2 1"}, {"role": "assistant", "content": "1 2"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "1 2"}]
    _, (ex,) = formatted(tok, [{"messages": messages}], assistant_only_loss=True)
    trained = tok.decode([t for t in ex["labels"] if t != -100])
    assert trained == "1 2<|end|>1 2<|end|>"
    _, (all_tokens,) = formatted(tok, [{"messages": messages}])
    assert all_tokens["labels"] == all_tokens["input_ids"]


def test_conversational_prompt_completion(tok):
    row = {"prompt": [{"role": "user", "content": "sort: 2 1"}],
           "completion": [{"role": "assistant", "content": "1 2"}]}
    _, (ex,) = formatted(tok, [row])
    assert tok.decode(ex["input_ids"]) == "<|user|>\nsort: 2 1<|end|>\n<|assistant|>\n1 2<|end|>\n"
    assert tok.decode([t for t in ex["labels"] if t != -100]) == "1 2<|end|>\n"


@pytest.mark.parametrize("settings, message", [
    ({"method.packing": True, "method.max_length": None}, "method.packing needs method.max_length"),
    ({"method.truncation_mode": "middle"}, "method.truncation_mode"),
    ({"method.max_length": 0}, "method.max_length"),
    ({"method.loss_implementation": "fast"}, "method.loss_implementation"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    pm = alignkit.get_plugin_manager()
    with pytest.raises(alignkit.ConfigError) as e:
        alignkit.load_config("sft", overrides=settings, plugins=pm)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("row, settings, message", [
    ({"question": "x"}, {}, "expected columns 'text' or 'messages' or 'prompt' and 'completion'"),
    ({"text": "abc"}, {"assistant_only_loss": True}, "assistant_only_loss=true needs conversational rows"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, {}, "must both be strings or both be"),
    ({"prompt": "a", "completion": ""}, {}, "'completion' is an empty string"),
])
def test_bad_rows_are_one_line_errors(tok, row, settings, message):
    with pytest.raises(alignkit.DataError) as e:
        SequenceFormatter(SFTConfig(**settings), tok).format(row)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_truncation_keeps_the_chosen_end_and_drops_untrained_rows(tok):
    _, (start,) = formatted(tok, ROWS[:1], max_length=4, completion_only_loss=False)
    _, (end,) = formatted(tok, ROWS[:1], max_length=4, truncation_mode="keep_end")
    full = tok(text=ROWS[0]["prompt"] + ROWS[0]["completion"] + tok.eos_token)["input_ids"]
    assert start["input_ids"] == full[:4] and end["input_ids"] == full[-4:]
    with pytest.raises(alignkit.DropExample):  # keep_start leaves only prompt tokens: nothing to train on
        SequenceFormatter(SFTConfig(max_length=4), tok).format(ROWS[0])
