"""The shared log-prob path (alignkit.blocks.logps): per-row stats equal full-logit float64 values; DPO, CPO and SimPO
give the same loss, metrics and gradients through the chunked head as through full logits; label_pad_token_id."""

import copy
import json

import alignkit_cpo
import alignkit_dpo
import alignkit_simpo
import pytest
import torch
from click.testing import CliRunner
from test_orpo_chunked import RTOL, assert_same, ragged_batch

from alignkit.blocks.logps import SequenceScorer
from alignkit.cli.commands import cli
from alignkit.testing import tiny_model


def test_row_stats_equal_float64_full_logits():
    model, b = tiny_model(tie_word_embeddings=False), ragged_batch(3, seed=7)
    nll = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    nll[3:] = -100
    scorer = SequenceScorer(chunk_size=5)
    scorer.prepare(model)
    with torch.no_grad():
        s, _, _ = scorer(model, b, nll_targets=nll)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    for i in range(6):
        labelled = [logp[i, t - 1, b["labels"][i, t]] for t in range(1, b["labels"].shape[1])
                    if b["labels"][i, t] != -100]
        targets = [-logp[i, t - 1, nll[i, t]] for t in range(1, nll.shape[1]) if nll[i, t] != -100]
        assert float(s.logps[i]) == pytest.approx(float(sum(labelled)), rel=1e-5)
        assert int(s.tokens[i]) == len(labelled) and int(s.nll_tokens[i]) == len(targets)
        assert float(s.nll[i]) == pytest.approx(float(sum(targets)), rel=1e-5, abs=1e-6)
        assert float(s.logits_sum[i]) == pytest.approx(float(logits[i, :-1].sum()), rel=1e-4, abs=1e-3)
        assert float(s.last_logits_sum[i]) == pytest.approx(float(logits[i, -1].sum()), rel=1e-4, abs=1e-4)
    assert s.positions == b["input_ids"].shape[1] - 1 and s.vocab == logits.shape[-1]


METHODS = {
    "dpo": (alignkit_dpo.DPOLoss, alignkit_dpo.DPOConfig, dict(beta=0.5, loss_type="robust", label_smoothing=0.1)),
    "cpo": (alignkit_cpo.CPOLoss, alignkit_cpo.CPOConfig, dict(beta=0.3, cpo_alpha=0.7)),
    "simpo": (alignkit_simpo.SimPOLoss, alignkit_simpo.SimPOConfig, dict(cpo_alpha=0.4)),
}


def run(method, model, batches, label_pad=-100, **options):
    """Loss, metrics and accumulated gradients of `batches` as one optimizer step (engine normalisation)."""
    loss_cls, config_cls, kwargs = METHODS[method]
    model = copy.deepcopy(model)
    config = config_cls(**kwargs, **options)
    object.__setattr__(config, "label_pad_token_id", label_pad)  # the formatter's field, merged in by the registry
    loss_fn = loss_cls(config)
    loss_fn.prepare_model(model)
    totals: dict[str, float] = {}
    for b in batches:
        for unit, c in loss_fn.counts(b).items():
            totals[unit] = totals.get(unit, 0) + c
    losses, metrics = [], []
    for b in batches:
        extra = {}
        if loss_fn.needs_reference_model:
            with torch.no_grad():
                extra["ref"] = loss_fn.reference(tiny_model(seed=5, tie_word_embeddings=False), b)
        out = loss_fn(model, b, **extra)
        loss = out.normalized(totals)
        loss.backward()
        losses.append(loss.detach())
        metrics.append({k: v.detach() for k, v in out.metrics.items()})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_fn, torch.stack(losses), metrics, grads



@pytest.mark.parametrize("method", METHODS)
def test_chunked_equals_plain_with_gradient_accumulation(method):
    model, batches = tiny_model(tie_word_embeddings=False), [ragged_batch(2, seed=2), ragged_batch(3, seed=3)]
    chunked = run(method, model, batches, logits_chunk_size=5)
    assert chunked[0].scorer.head is not None
    plain = run(method, model, batches, loss_implementation="plain")
    assert plain[0].scorer.head is None
    assert_same(chunked, plain)


@pytest.mark.parametrize("method", ["cpo", "dpo"])
def test_chunked_equals_plain_tied_and_with_lora_on_the_head(method):
    import peft

    b = ragged_batch()
    assert_same(run(method, tiny_model(), [b], logits_chunk_size=3),
                run(method, tiny_model(), [b], loss_implementation="plain"))
    torch.manual_seed(0)
    lora = peft.get_peft_model(tiny_model(tie_word_embeddings=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert_same(run(method, lora, [b], logits_chunk_size=4), run(method, lora, [b], loss_implementation="plain"))


@pytest.mark.parametrize("method", METHODS)
def test_label_pad_token_id_is_read_from_the_config(method):
    """Labels padded with -1 and label_pad_token_id=-1 give the numbers of the default -100."""
    model, b = tiny_model(), ragged_batch(seed=8)
    other = {**b, "labels": b["labels"].masked_fill(b["labels"] == -100, -1)}
    for impl in ("chunked", "plain"):
        assert_same(run(method, model, [other], label_pad=-1, loss_implementation=impl),
                    run(method, model, [b], loss_implementation=impl))


def test_cli_runs_dpo_with_another_label_pad_token_id(tmp_path):
    def metrics(name, *overrides):
        result = CliRunner().invoke(cli, ["run", "--method", "dpo", f"train.output_dir={tmp_path / name}",
                                          "train.max_steps=2",
                                          "data.max_train_samples=8", "data.max_eval_samples=4",
                                          "train.disable_tqdm=true",
                                          "train.plots=false", *overrides])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    default, other = metrics("a"), metrics("b", "method.label_pad_token_id=-1")
    steps = [r for r in default if "loss" in r]
    assert steps and len(steps) == len([r for r in other if "loss" in r])
    for a, b in zip(default, other):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_the_engines_totals_spare_the_recompute_under_gradient_accumulation():
    """Two micro-batches weight ORPO's terms by the step's totals, not each batch's counts: given ctx.totals
    the fused head's forward gradients are used as they are (no head call in the backward); without them
    the backward recomputes. Both give the same gradients."""
    from types import SimpleNamespace

    from alignkit_orpo import ORPOLoss, ORPOMethodConfig

    batches = [ragged_batch(2, seed=2), ragged_batch(3, seed=3)]

    def step(with_totals):
        model = tiny_model(tie_word_embeddings=False)
        loss_fn = ORPOLoss(ORPOMethodConfig(logits_chunk_size=64))
        loss_fn.prepare_model(model)
        totals: dict[str, float] = {}
        for b in batches:
            for unit, c in loss_fn.counts(b).items():
                totals[unit] = totals.get(unit, 0) + c
        calls, in_backward = [], [False]
        model.lm_head.register_forward_hook(lambda m, i, o: calls.append(in_backward[0]))
        for b in batches:
            in_backward[0] = False
            out = loss_fn(model, b, ctx=SimpleNamespace(totals=totals) if with_totals else None)
            in_backward[0] = True
            out.normalized(totals).backward()
        return sum(calls), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    backward_calls, grads = step(True)
    recomputed, expected = step(False)
    assert backward_calls == 0 and recomputed > 0
    for n in expected:
        assert (grads[n] - expected[n]).norm() / expected[n].norm() <= RTOL, n
