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


def test_moe_router_loss_runs_unshared():
    """The router's load-balancing loss counts tokens, so a MoE model with it keeps the unshared rows."""
    model, b = tiny_qwen2_moe(), ragged_batch()
    assert_same(run(model, [b], share_prompt=True), run(model, [b], loss_implementation="plain"))
