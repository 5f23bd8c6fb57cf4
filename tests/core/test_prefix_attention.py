"""The split prefix attention (alignkit.blocks.prefix_attention): a shared row's first part runs causal, only the
second part under a mask; scores and gradients equal the full mask's and the padded batch's."""

import pytest
import torch
from test_reward_speed_paths import PAD, classifier  # the reward tests' classifier and rows
from test_reward_speed_paths import pair_batch as reward_pairs

from alignkit.blocks.prefix_attention import PREFIX_ATTENTION, enable_prefix_attention, prefix_attention_forward
from alignkit.blocks.sharing import sequence_classifier, share_rows, shared_scores


def qwen2_classifier(**overrides):
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=PAD, **overrides)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


def pair_batch(lengths, seed=0):
    """Right-padded [chosen; rejected] ids and mask; lengths: (prompt, chosen answer, rejected answer) per pair."""
    batch = reward_pairs(lengths, seed)
    return batch["input_ids"], batch["attention_mask"]


def mask_shapes(model):
    """The attention-mask shape the first layer's attention gets at each forward."""
    shapes = []
    attention = model.model.layers[0].self_attn
    attention.register_forward_pre_hook(
        lambda m, a, k: shapes.append(None if k["attention_mask"] is None else tuple(k["attention_mask"].shape)),
        with_kwargs=True)
    return shapes


def scores_and_grads(model, ids, mask, shared=True):
    model.zero_grad()
    if shared:
        scores = shared_scores(model, sequence_classifier(model), ids, mask)[:, 0]
    else:
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    (scores * torch.linspace(-1, 1, len(scores))).sum().backward()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for name, grad in b[1].items():
        torch.testing.assert_close(a[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_split_scores_and_gradients_equal_the_full_mask_and_the_padded_batch(gradient_checkpointing):
    model = classifier()
    if gradient_checkpointing:  # the recomputed forward reads the same split mask
        model.activation_checkpointing_enable()
        model.train()
    ids, mask = pair_batch([(9, 4, 7), (5, 6, 2), (12, 3, 3)])
    shapes = mask_shapes(model)
    padded = scores_and_grads(model, ids, mask, shared=False)
    shapes.clear()
    full = scores_and_grads(model, ids, mask)  # sdpa: the whole [L, L] mask
    width, length = ids.shape[1], shapes[0][-1]
    assert set(shapes) == {(3, 1, length, length)}
    assert enable_prefix_attention(model) and model.config._attn_implementation == PREFIX_ATTENTION
    shapes.clear()
    split = scores_and_grads(model, ids, mask)
    assert set(shapes) == {(3, 1, length - width, length)}  # (twice with checkpointing: the recompute too)
    assert len(shapes) == 1 + gradient_checkpointing
    assert_same(full, padded)
    assert_same(split, padded)
    with torch.no_grad():  # a plain batch: sdpa as before
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0], padded[0])


def test_the_attention_function_equals_sdpa_with_the_whole_mask_on_real_queries():
    """Grouped-query heads; the first part's real queries and every second-part query match the full mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ids, mask = pair_batch([(6, 5, 3), (4, 2, 6)], seed=2)
    shared = share_rows(ids, mask, torch.float32)
    split = share_rows(ids, mask, torch.float32, split=True)
    pairs, length, width = shared.input_ids.shape[0], shared.input_ids.shape[1], ids.shape[1]
    assert split.attention_mask.shape == (pairs, 1, length - width, length)
    torch.testing.assert_close(split.attention_mask, shared.attention_mask[:, :, width:])
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(pairs, heads, length, 8, generator=g) for heads in (4, 2, 2))
    want, _ = sdpa_attention_forward(module, q, k, v, shared.attention_mask, scaling=0.3)
    got, _ = prefix_attention_forward(module, q, k, v, split.attention_mask, scaling=0.3)
    real_first = torch.zeros(pairs, length, dtype=torch.bool)
    real_first[:, :width] = mask[:pairs].bool()
    real_first[:, width:] = True
    torch.testing.assert_close(got[real_first], want[real_first], rtol=1e-5, atol=1e-6)
    same, _ = prefix_attention_forward(module, q, k, v, shared.attention_mask, scaling=0.3)
    assert torch.equal(same, want)  # a mask with a row per query: sdpa itself


def test_left_padded_first_rows_and_padding_read_as_the_pooled_token_keep_the_whole_mask():
    model = classifier()
    enable_prefix_attention(model)
    shapes = mask_shapes(model)
    ids, mask = pair_batch([(7, 3, 4), (5, 4, 2)])
    left_ids, left_mask = ids.clone(), mask.clone()  # the first pair's rows shifted right by one: a left pad
    for row in (0, 2):
        left_ids[row], left_mask[row] = left_ids[row].roll(1), left_mask[row].roll(1)
    padded = scores_and_grads(model, left_ids, left_mask, shared=False)
    assert_same(scores_and_grads(model, left_ids, left_mask), padded)
    assert shapes[-1][-2] == shapes[-1][-1]
    # a collator that pads with another id than the pad token: the model pools a padding position
    odd = ids.masked_fill(mask == 0, 5)
    padded = scores_and_grads(model, odd, mask, shared=False)
    assert_same(scores_and_grads(model, odd, mask), padded)
    assert shapes[-1][-2] == shapes[-1][-1]


def test_sliding_window_models_are_not_shared_a_given_4d_mask_would_drop_their_windows():
    model = qwen2_classifier(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not enable_prefix_attention(model) and model.config._attn_implementation == "sdpa"
    assert sequence_classifier(model) is None  # the reward loss runs the padded batch
    ids, mask = pair_batch([(8, 3, 4), (5, 4, 6)])
    with torch.no_grad():  # why: the windows the model builds for the padded batch are not in the shared mask
        whole = share_rows(ids, mask, torch.float32)
        out = model.model(input_ids=whole.input_ids, attention_mask=whole.attention_mask,
                          position_ids=whole.position_ids).last_hidden_state
        padded = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(whole.unshare(out)[0, 7], padded[0, 7], atol=1e-3)
    full = qwen2_classifier()
    assert enable_prefix_attention(full)
    assert_same(scores_and_grads(full, ids, mask), scores_and_grads(full, ids, mask, shared=False))


def test_eager_models_are_left_alone():
    model = classifier("eager")
    assert not enable_prefix_attention(model) and model.config._attn_implementation == "eager"


def test_the_switch_is_not_saved_and_the_saved_model_scores_the_same(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = classifier()
    assert enable_prefix_attention(model)
    model.save_pretrained(tmp_path)
    assert PREFIX_ATTENTION not in (tmp_path / "config.json").read_text()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "sdpa"
    ids, mask = pair_batch([(6, 3, 5), (4, 4, 2)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   shared_scores(model, sequence_classifier(model), ids, mask), rtol=1e-5, atol=1e-6)
