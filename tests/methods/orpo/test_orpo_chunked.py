"""The chunked LM-head path and padding-free packing give the plain path's loss, metrics and gradients."""

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from alignkit import ConfigError
from alignkit.testing import tiny_model
from alignkit_orpo import ORPOLoss, ORPOMethodConfig
from helpers import FixedLogits, two_pairs

RTOL = 1e-5


def ragged_batch(pairs: int = 3, seed: int = 1) -> dict:
    """Chosen then rejected rows of different lengths: prompts of 2-5 tokens, answers of 1-6, right padding."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    prompts = [torch.randint(3, 384, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g) for _ in range(pairs)]
    for _side in range(2):
        for p in prompts:
            a = torch.randint(3, 384, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
            ids = torch.cat([torch.tensor([1]), p, a, torch.tensor([2])])
            rows.append(ids)
            labels.append(torch.cat([torch.full((1 + len(p),), -100), a, torch.tensor([2])]))
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=torch.long)]) for r in rows])
    lab = torch.stack([torch.cat([r, torch.full((width - len(r),), -100)]) for r in labels])
    return {"input_ids": ids,
            "attention_mask": (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long(),
            "labels": lab}


def run(model, batches, **method):
    """Loss, metrics and accumulated gradients of `batches` as one optimizer step (engine normalisation)."""
    model = copy.deepcopy(model)
    loss_fn = ORPOLoss(ORPOMethodConfig(**method))
    loss_fn.prepare_model(model)
    totals: dict[str, float] = {}
    for b in batches:
        for unit, c in loss_fn.counts(b).items():
            totals[unit] = totals.get(unit, 0) + c
    losses, metrics = [], []
    for b in batches:
        out = loss_fn(model, b)
        loss = out.normalized(totals)
        loss.backward()
        losses.append(loss.detach())
        metrics.append({k: v.detach() for k, v in out.metrics.items()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_fn, torch.stack(losses), metrics, grads


def assert_same(a, b):
    """Loss and metrics within 1e-5 relative; each parameter's gradient within 1e-5 relative (in norm: single
    elements near zero are differences of larger terms, summed in another order)."""
    _, loss_a, metrics_a, grads_a = a
    _, loss_b, metrics_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=RTOL, atol=0)
    for ma, mb in zip(metrics_a, metrics_b):
        assert ma.keys() == mb.keys()
        for k in ma:
            # margins and log-odds are differences of O(1) log-probs (~-6 here), so their rounding is relative to
            # those operands; logits/* of a random model are ~1e-3 and get a float32 floor of 1e-8
            atol = 1e-8 if k.startswith("logits/") else RTOL * max(1.0, abs(ma["logps/chosen"].item()))
            torch.testing.assert_close(ma[k], mb[k], rtol=RTOL, atol=atol, msg=k)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        error = (grads_a[n] - grads_b[n]).norm() / grads_b[n].norm()
        assert error <= RTOL, f"{n}: relative gradient difference {error:.2e}"


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_equals_plain(chunk, tied):
    model, b = tiny_model(tie_word_embeddings=tied), ragged_batch()
    chunked = run(model, [b], logits_chunk_size=chunk)
    assert chunked[0].head is not None  # the chunked path ran
    assert_same(chunked, run(model, [b], loss_implementation="plain"))


def test_chunked_equals_plain_with_gradient_accumulation_and_completion_nll():
    model, batches = tiny_model(), [ragged_batch(2, seed=2), ragged_batch(3, seed=3)]
    for scope in ("sequence", "completion"):
        assert_same(run(model, batches, nll_scope=scope, logits_chunk_size=7),
                    run(model, batches, nll_scope=scope, loss_implementation="plain"))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
def test_chunked_equals_plain_with_lora(targets):
    """LoRA on the attention only, and on the LM head too (then the head is a LoRA module, not a Linear)."""
    import peft

    base = tiny_model(tie_word_embeddings=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
    b = ragged_batch()
    chunked = run(model, [b], logits_chunk_size=4)
    assert type(chunked[0].head.module) is not torch.nn.Linear or "lm_head" not in targets
    assert_same(chunked, run(model, [b], loss_implementation="plain"))


def tiny_qwen2_moe():
    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=384, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def test_chunked_and_padding_free_equal_plain_on_moe():
    model, b = tiny_qwen2_moe(), ragged_batch()
    plain = run(model, [b], loss_implementation="plain")
    assert plain[0].aux_loss_coef == 0.02
    assert_same(run(model, [b]), plain)
    assert_same(*without_logits_metrics(run(model, [b], padding_free=True), plain))


def without_logits_metrics(*results):
    """logits/* include padding positions in the padded path; packed rows have none (documented)."""
    for result in results:
        for m in result[2]:
            m.pop("logits/chosen"), m.pop("logits/rejected")
    return results


def test_padding_free_equals_padded():
    """Packing all rows into one with per-sequence positions: the same loss, metrics and gradients."""
    model, batches = tiny_model(), [ragged_batch(3, seed=4), ragged_batch(2, seed=5)]
    padded = run(model, batches, loss_implementation="plain")
    assert_same(*without_logits_metrics(run(model, batches, padding_free=True), padded))


def test_padding_free_keeps_sequences_apart():
    """A row's log-probs do not depend on the other rows packed beside it."""
    model = tiny_model()
    b = ragged_batch(2, seed=6)
    alone = {k: v[[0, 2]] for k, v in b.items()}
    loss_fn = ORPOLoss(ORPOMethodConfig(padding_free=True))
    loss_fn.prepare_model(model)
    with torch.no_grad():
        both, single = loss_fn.forward(model, b), loss_fn.forward(model, alone)
    torch.testing.assert_close(both.chosen_logps[:1], single.chosen_logps, rtol=RTOL, atol=0)
    torch.testing.assert_close(both.rejected_logps[:1], single.rejected_logps, rtol=RTOL, atol=0)


@pytest.mark.parametrize("share", [True, False])
def test_no_full_logits_are_kept_for_backward_and_the_head_runs_once(share):
    """The plain path keeps [rows, T, V] logits for backward; the fused head keeps no vocab-wide tensor (the
    backward reads only the gradients computed in the forward) and runs the head once per chunk."""
    model, b = tiny_model(), ragged_batch(4)
    rows, width = b["input_ids"].shape
    vocab = model.config.vocab_size

    def backward_reads(**method):
        loss_fn = ORPOLoss(ORPOMethodConfig(share_prompt=share, **method))
        loss_fn.prepare_model(model)
        sizes, in_backward, calls = [], [False], []
        weights = {p.data_ptr() for p in model.parameters()}

        def unpack(t):
            if in_backward[0] and t.data_ptr() not in weights and t.dim() and t.shape[-1] == vocab:
                sizes.append(t.numel())
            return t

        handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            loss = loss_fn(model, b).normalized(loss_fn.counts(b))
            in_backward[0] = True
            loss.backward()
        handle.remove()
        return max(sizes, default=0), calls

    if not share:
        assert backward_reads(loss_implementation="plain")[0] >= rows * (width - 1) * vocab
    largest, calls = backward_reads(logits_chunk_size=64)  # whole pairs per chunk
    assert largest == 0
    first_half = (torch.arange(rows) < rows // 2)[:, None]
    scored = int(((b["labels"][:, 1:] != -100) | ((b["attention_mask"][:, 1:] == 1) & first_half)).sum())
    # the model's own head scores one position per row it runs (one per pair when shared); the split-off head
    # each scored position exactly once, plus check_head's one position per row the model ran
    ran = rows // 2 if share else rows
    assert calls[0] == ran and sum(calls[1:]) == scored + ran


def test_models_without_logits_to_keep_fall_back_to_plain(caplog):
    logits = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    model = FixedLogits(logits)
    model.config = type("C", (), {})()
    loss_fn = ORPOLoss(ORPOMethodConfig())
    with caplog.at_level(logging.WARNING):
        loss_fn.prepare_model(model)
    assert loss_fn.head is None and "plain path" in caplog.text
    assert loss_fn.forward(model, two_pairs()).logits is not None


def test_padding_free_needs_a_packing_attention():
    model = tiny_model()
    model.config._attn_implementation = "some_kernel"
    with pytest.raises(ConfigError, match="method.padding_free.*some_kernel"):
        ORPOLoss(ORPOMethodConfig(padding_free=True)).prepare_model(model)


def test_training_with_length_grouping_and_packing_is_deterministic_and_matches_padded(tmp_path, pm):
    """train.group_by_length is a function of the seed; packing trains to the padded path's numbers."""
    import alignkit
    from helpers import fast, read_jsonl

    def losses(name, **method):
        cfg = fast(tmp_path / name, max_steps=3, group_by_length=True)
        cfg["method"] = method
        result = alignkit.run("orpo", cfg, plugins=pm)
        return [r["loss"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]

    padded = losses("a", loss_implementation="plain")
    assert losses("b", loss_implementation="plain") == padded
    torch.testing.assert_close(torch.tensor(losses("c", padding_free=True)), torch.tensor(padded), rtol=RTOL, atol=0)


def test_a_head_that_does_not_reproduce_the_logits_is_refused():
    """A logit transform the split-off head misses (here: a scale it does not know) is caught before training."""
    model, b = tiny_model(), ragged_batch()
    loss_fn = ORPOLoss(ORPOMethodConfig())
    loss_fn.prepare_model(model)
    loss_fn.head.scale = 2.0
    with pytest.raises(ConfigError, match="method.loss_implementation=plain"):
        loss_fn(model, b)


@pytest.mark.slow
def test_chunked_equals_plain_under_fsdp2_on_cpu(tmp_path):
    """FSDP2 (fully_shard per decoder layer and root) in 2 CPU processes on gloo: the head's weight is used after
    the root forward, where FSDP2 keeps the root's parameters unsharded. Slow (deselected by default)."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    worker = Path(__file__).parent / "fsdp_worker.py"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(worker)], capture_output=True, text=True, timeout=300)
    results = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    others = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT_TOKEN_ROW")]
    assert out.returncode == 0 and len(results) == 2 and len(others) == 2, out.stderr[-2000:]
    for grad_error, metric_error in results + others:  # ORPO (grads, metrics); SFT and KTO (loss and grads each)
        assert float(grad_error) <= RTOL and float(metric_error) <= RTOL
