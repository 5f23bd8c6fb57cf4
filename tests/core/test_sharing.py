"""Prefix sharing (method.share_prompt): one row per pair gives the unshared path's loss, metrics and gradients."""

import pytest
import torch
from test_logps import run as run_method
from test_orpo_chunked import assert_same, ragged_batch, run, tiny_qwen2_moe

from alignkit import ConfigError
from alignkit.blocks.sharing import common_prefix, share_rows
from alignkit.testing import tiny_model
from alignkit_orpo import ORPOLoss, ORPOMethodConfig


def test_layout_by_hand():
    """Pair (1 5 6 7 2 | 1 5 9 2 0): prefix 2; the second part restarts at position 2 and sees only the prefix."""
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 5, 9, 2, 0]])
    mask = (torch.arange(5)[None] < torch.tensor([[5], [4]])).long()
    assert common_prefix(ids, mask).tolist() == [2]
    s = share_rows(ids, mask, torch.float32)
    assert s.input_ids.tolist() == [[1, 5, 6, 7, 2, 9, 2, 0]]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4]]
    allowed = (s.attention_mask[0, 0] == 0).int()
    assert allowed[5].tolist() == [1, 1, 0, 0, 0, 1, 0, 0]  # 9 at position 2: the prefix and itself
    assert allowed[7].tolist() == [1, 1, 0, 0, 0, 1, 1, 0]  # padding: the real tokens of its row, not itself
    assert allowed[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert s.index.tolist() == [[0, 1, 2, 3, 4], [0, 1, 5, 6, 7]]


@pytest.mark.parametrize("tied", [True, False])
def test_shared_equals_unshared_and_plain(tied):
    model, batches = tiny_model(tie_word_embeddings=tied), [ragged_batch(3, seed=1), ragged_batch(2, seed=9)]
    shared = run(model, batches, share_prompt=True, logits_chunk_size=16)
    assert shared[0].scorer.share_prompt
    assert_same(shared, run(model, batches, share_prompt=False))
    assert_same(shared, run(model, batches, loss_implementation="plain"))


def test_shared_equals_unshared_with_eager_attention_lora_and_completion_nll():
    import peft

    model = tiny_model(tie_word_embeddings=False)
    model.set_attn_implementation("eager")
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                       init_lora_weights=False))
    b = ragged_batch(3, seed=4)
    assert_same(run(model, [b], share_prompt=True, nll_scope="completion"),
                run(model, [b], loss_implementation="plain", nll_scope="completion"))


def test_prompts_that_differ_in_their_last_token_share_the_common_part():
    """A prompt token merged with the answer's first characters differs between the two rows: only the
    tokens before it are shared."""
    b = ragged_batch(3, seed=5)
    n = 3
    first_label = (b["labels"][n:] != -100).int().argmax(-1)
    b["input_ids"][n + 1, first_label[1] - 1] = 77  # rejected row 1: its last prompt token differs
    prefix = common_prefix(b["input_ids"], b["attention_mask"])
    assert prefix[1] == first_label[1] - 1
    model = tiny_model()
    assert_same(run(model, [b], share_prompt=True), run(model, [b], loss_implementation="plain"))


@pytest.mark.parametrize("method", ["dpo", "cpo", "simpo"])
def test_other_pairwise_methods_share_too(method):
    model, b = tiny_model(tie_word_embeddings=False), ragged_batch(3, seed=6)
    shared = run_method(method, model, [b], share_prompt=True)
    assert shared[0].scorer.share_prompt
    from test_logps import assert_same as same

    same(shared, run_method(method, model, [b], loss_implementation="plain"))


def test_on_by_default_where_supported_and_refused_where_not():
    loss = ORPOLoss(ORPOMethodConfig())
    loss.prepare_model(tiny_model())
    assert loss.scorer.share_prompt is True
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    loss = ORPOLoss(ORPOMethodConfig())
    loss.prepare_model(model)
    assert loss.scorer.share_prompt is False
    with pytest.raises(ConfigError,
                       match="method.share_prompt needs .* flash_attention_2.*set method.share_prompt=false"):
        ORPOLoss(ORPOMethodConfig(share_prompt=True)).prepare_model(model)
    with pytest.raises(ConfigError, match="method.share_prompt"):
        ORPOLoss(ORPOMethodConfig(share_prompt=True, loss_implementation="plain")).prepare_model(tiny_model())


def test_sliding_window_models_run_unshared_and_share_prompt_true_is_refused():
    """A 4D mask given to the model replaces the sliding windows it builds, so a model with a sliding-window layer
    keeps the padded rows (the plain path's losses) and refuses share_prompt=true in one line."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                         max_window_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    loss = ORPOLoss(ORPOMethodConfig())
    loss.prepare_model(model)
    assert loss.scorer.share_prompt is False
    b = ragged_batch()
    assert_same(run(model, [b]), run(model, [b], loss_implementation="plain"))
    with pytest.raises(ConfigError, match=r"full attention in every layer \(this model: sdpa with sliding windows\)"):
        ORPOLoss(ORPOMethodConfig(share_prompt=True)).prepare_model(model)


def test_moe_router_loss_runs_unshared():
    """The router's load-balancing loss counts tokens, so a MoE model with it keeps the unshared rows."""
    model, b = tiny_qwen2_moe(), ragged_batch()
    assert_same(run(model, [b], share_prompt=True), run(model, [b], loss_implementation="plain"))


# ---- groups: an online method's samples of one prompt ------------------------------------------------------

def test_group_layout_by_hand():
    """Two samples of a left-padded prompt (0 3 4 | 7 8 and 0 3 4 | 9 0): one row, the second sample after the
    first row, at its own positions, seeing the prompt and itself; a lone third row keeps its own group."""
    from alignkit.blocks.sharing import prefix_groups, share_groups

    ids = torch.tensor([[0, 3, 4, 7, 8], [0, 3, 4, 9, 0], [5, 6, 1, 1, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    groups = prefix_groups(ids, mask, min_prefix=2)
    assert groups == [(0, 2, 3), (2, 1, 5)]
    s = share_groups(ids, mask, groups, torch.float32)
    assert s.input_ids[0].tolist() == [0, 3, 4, 7, 8, 9, 0]
    assert s.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4]
    allowed = (s.attention_mask[0, 0] == 0).int()
    assert allowed[5].tolist() == [0, 1, 1, 0, 0, 1, 0]  # 9: the prompt's real tokens and itself
    assert allowed[4].tolist() == [0, 1, 1, 1, 1, 0, 0]  # 8: its own row
    assert allowed[0].tolist() == [1, 0, 0, 0, 0, 0, 0]  # a padding query with no real key: itself
    assert s.index[:2].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 5, 6]]
    assert s.index[2].tolist() == [7, 8, 9, 10, 11]


def _grouped_batch(seed: int):
    """Prompts of unequal length (left-padded), 3 or 4 samples each (right-padded, some sharing first tokens), a
    prompt with a single sample; a GRPO-shaped batch."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (29, 25, 32, 27)]
    samples = [3, 4, 1, 3]
    rows_p, rows_c = [], []
    for p, k in zip(prompts, samples):
        for j in range(k):
            c = torch.randint(3, 60, (int(torch.randint(1, 8, (), generator=g)),), generator=g).tolist()
            rows_p.append(p)
            rows_c.append([p[-1] + 1, 4] + c if j < 2 else c)  # the first two samples share two tokens
    from alignkit.online.completions import pad_rows

    prompt_ids, prompt_mask = pad_rows(rows_p, 0, left=True)
    completion_ids, completion_mask = pad_rows(rows_c, 0, left=False)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_grouped_completion_logps_and_gradients_equal_unshared(attention):
    """Each prompt run once for its samples: the same per-token log-probs, entropies and gradients of a summed
    term (the fused head) as every row run whole."""
    from alignkit.blocks.logps import TokenScorer
    from alignkit.online.completions import completion_inputs

    model = tiny_model(seed=2)
    model.config._attn_implementation = attention
    batch = _grouped_batch(seed=4)
    results = []
    for share in (True, False):
        scorer = TokenScorer(chunk_size=7, temperature=0.9, share_prefix=share)
        model.zero_grad()
        calls = []
        handle = model.register_forward_pre_hook(lambda m, a, kw, calls=calls: calls.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
        s = scorer(model, *completion_inputs(batch), term=lambda lp, pos: (lp + 0.1 * lp.square()).sum())
        handle.remove()
        s.total.backward()
        results.append((s.logps.detach(), s.entropy, {n: p.grad.clone() for n, p in model.named_parameters()},
                        calls[0]))
        with torch.no_grad():  # the no-grad path (a rollout's old or reference log-probs)
            results[-1] += (scorer(model, *completion_inputs(batch)).logps,)
    shared, whole = results
    assert shared[3][0] == 4 and whole[3][0] == 11  # one row per prompt against one per sample
    torch.testing.assert_close(shared[0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared[1], whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared[4], whole[4], rtol=1e-5, atol=1e-6)
    for name in whole[2]:
        torch.testing.assert_close(shared[2][name], whole[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_head_chunk_shrinks_with_a_large_vocabulary():
    """The token scorer's head chunks hold at most 2**24 float32 logits: 524 positions at 32,000 tokens, 83 at
    200,000; an explicit smaller chunk stays as set. The same log-probs and gradients either way."""
    from alignkit.blocks.lmhead import LMHead
    from alignkit.blocks.logps import TokenScorer
    from alignkit.online.completions import completion_inputs

    assert LMHead(torch.nn.Linear(8, 32000, bias=False)).chunk_positions(1024) == 524
    assert LMHead(torch.nn.Linear(8, 200000, bias=False)).chunk_positions(1024) == 83
    assert LMHead(torch.nn.Linear(8, 300, bias=False)).chunk_positions(4096) == 4096
    assert LMHead(torch.nn.Linear(8, 200000, bias=False)).chunk_positions(16) == 16
    model = tiny_model(seed=1)
    model.resize_token_embeddings(200000, mean_resizing=False)
    batch = _grouped_batch(seed=5)
    batch = {k: torch.cat([v] * 8) for k, v in batch.items()}  # 88 rows: more counted positions than one chunk
    rows = []
    seen = []
    hook = model.lm_head.register_forward_hook(  # the chunks' [n, H] inputs (not the body's [B, 1, H] one)
        lambda m, a, out: seen.append(a[0].shape[0]) if a[0].dim() == 2 else None)
    for chunk in (1024, 70):  # capped at 83, and chunks of 70
        model.zero_grad()
        seen.clear()
        s = TokenScorer(chunk_size=chunk)(model, *completion_inputs(batch), term=lambda lp, pos: lp.sum())
        s.total.backward()
        rows.append((s.logps.detach(), model.model.embed_tokens.weight.grad.clone(), seen[1:]))  # [0]: the head check
    hook.remove()
    capped, whole = rows
    n = int(batch["completion_mask"].sum())
    assert n > 83 and capped[2][0] == 83 and sum(capped[2]) == n and max(whole[2]) == 70
    torch.testing.assert_close(capped[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(capped[1], whole[1], rtol=1e-4, atol=2e-5)  # summed in another order
