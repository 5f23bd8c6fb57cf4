"""Row-sparse embedding gradients (alignkit.engine.embedding_grads): the dense gradient they give equals the dense
backward's, step after step (rows of the last step zeroed) and over accumulated micro-batches; they are used only
for a large, trained, untied embedding in one process; a run with them trains the weights a run without them does."""

import alignkit_reward
import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import alignkit
from alignkit.engine import embedding_grads
from alignkit.engine.embedding_grads import RowGrads
from alignkit.testing import plugin_manager
from helpers import fast


def model(tied: bool, vocab: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(config)


def grads(m, batches):
    for ids in batches:
        m(input_ids=ids, labels=ids).loss.backward()


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(embedding_grads, "MIN_ELEMENTS", 0)


def test_the_dense_gradient_equals_the_dense_backward_over_steps_and_micro_batches(small_threshold):
    dense, sparse = model(False), model(False)
    rows = RowGrads.maybe(sparse, num_processes=1)
    assert rows is not None and sparse.get_input_embeddings().sparse
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # each step other tokens (some repeated within a row): last step's rows must be zeroed
        batches = [torch.randint(1, 300 if step else 40, (2, 9), generator=g) for _ in range(2)]
        grads(dense, batches)
        grads(sparse, batches)
        rows.densify()
        got = sparse.get_input_embeddings().weight.grad
        assert got.layout == torch.strided and not got.is_sparse
        torch.testing.assert_close(got, dense.get_input_embeddings().weight.grad, rtol=1e-6, atol=1e-7)
        for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
        dense.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=step != 1)  # step 1: zeroed in place, as a caller of zero_grad(False) does
    rows.close()
    assert not sparse.get_input_embeddings().sparse


def test_used_only_for_a_large_trained_untied_embedding_in_one_process(monkeypatch):
    assert RowGrads.maybe(model(False), 1) is None  # 300 x 32 entries: below MIN_ELEMENTS
    monkeypatch.setattr(embedding_grads, "MIN_ELEMENTS", 0)
    assert RowGrads.maybe(model(True), 1) is None  # tied to the LM head: its gradient is dense anyway
    assert RowGrads.maybe(model(False), 2) is None  # DDP all-reduces dense gradients
    frozen = model(False)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert RowGrads.maybe(frozen, 1) is None
    assert RowGrads.maybe(model(False), 1) is not None


def _reward_run(tmp_path):
    config = fast(tmp_path, max_steps=3, learning_rate=3e-3, gradient_accumulation_steps=2,
                  per_device_train_batch_size=2)
    config["data"]["train"] = "builtin:sort-reward"
    alignkit.run("reward", config, plugins=plugin_manager(alignkit_reward))
    return AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")


def test_a_run_with_them_trains_the_weights_a_run_without_them_does(tmp_path, monkeypatch):
    made, densified = [], []
    original_maybe, original_densify = RowGrads.maybe.__func__, RowGrads.densify

    def maybe(cls, model, num_processes):
        made.append(original_maybe(cls, model, num_processes))
        return made[-1]

    def densify(self):
        densified.append(self.embedding.weight.grad.is_sparse)
        original_densify(self)

    monkeypatch.setattr(RowGrads, "maybe", classmethod(maybe))
    monkeypatch.setattr(RowGrads, "densify", densify)
    without = _reward_run(tmp_path / "dense")  # the built-in model's embedding is below the threshold
    assert made == [None] and densified == []
    monkeypatch.setattr(embedding_grads, "MIN_ELEMENTS", 0)
    with_rows = _reward_run(tmp_path / "rows")  # a classifier: its embedding is not tied to a head
    assert isinstance(made[-1], RowGrads) and densified == [True] * 3  # every step's backward was sparse
    assert not made[-1].embedding.sparse  # put back when training ended
    for (name, a), b in zip(without.named_parameters(), with_rows.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
