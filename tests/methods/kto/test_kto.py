"""The KTO plugin: its maths against a float64 hand reference, the KL estimate reduced over processes,
the weights, paired rows unpaired, the reference (live, precomputed, LoRA), config errors, the demo job."""

from types import SimpleNamespace

import alignkit_kto
import pytest
import torch
from alignkit_kto import KTOConfig, KTOLoss

import alignkit
from alignkit.testing import tiny_tokenizer
from helpers import ROOT, fast, read_jsonl

IGNORE = -100


class Bigram(torch.nn.Module):
    """Stands in for a causal LM whose next-token logits depend on the current token only: W[id]."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def seq_logp(table, ids, labels):
    """Summed float64 log-probs of the labelled tokens of one row (label at t predicted from the token at t-1)."""
    logp = torch.log_softmax(table.double(), -1)
    return sum(logp[ids[t - 1], labels[t]] for t in range(1, len(ids)) if labels[t] != IGNORE)


def batch_of(rows):
    """Collate (prompt, completion, KL completion, label) token lists like the formatter does."""
    def pad(lists, value):
        width = max(len(x) for x in lists)
        return torch.tensor([x + [value] * (width - len(x)) for x in lists])

    out = {"label": torch.tensor([r[3] for r in rows])}
    for prefix, part in (("", 1), ("KL_", 2)):
        ids = [r[0] + r[part] for r in rows]
        out[f"{prefix}input_ids"] = pad(ids, 0)
        out[f"{prefix}attention_mask"] = pad([[1] * len(x) for x in ids], 0)
        out[f"{prefix}labels"] = pad([[IGNORE] * len(r[0]) + r[part] for r in rows], IGNORE)
    return out


ROWS = [([1, 5], [6, 7, 2], [9, 2], True), ([1, 8, 4], [9, 2], [6, 7, 2], False),
        ([1, 3], [5, 5, 4, 2], [9, 9, 2], True), ([1, 7], [9, 9, 2], [5, 5, 4, 2], False),
        ([1, 6, 6], [3, 2], [9, 2], False)]


def batch_kl(policy, ref, rows) -> float:
    """The batch's mean of log pi(y'|x) - log pi_ref(y'|x) over its KL pairs, unclamped."""
    b = batch_of(rows)
    terms = [seq_logp(policy.table, b["KL_input_ids"][i], b["KL_labels"][i])
             - seq_logp(ref.table, b["KL_input_ids"][i], b["KL_labels"][i]) for i in range(len(rows))]
    return float(sum(terms).detach()) / len(rows)


def hand(policy, ref, rows, beta, loss_type, wd, wu, kl=None):
    """The KTO loss and metrics, in float64, example by example. `policy` may be a float64 table (the loss then
    keeps its gradient; the KL estimate never does)."""
    b = batch_of(rows)
    policy = policy if isinstance(policy, Bigram) else SimpleNamespace(table=policy)
    ref = SimpleNamespace(table=ref.table.detach())
    pol = [seq_logp(policy.table, b["input_ids"][i], b["labels"][i]) for i in range(len(rows))]
    rf = [seq_logp(ref.table, b["input_ids"][i], b["labels"][i]) for i in range(len(rows))]
    if kl is None:
        kl = max(batch_kl(policy, ref, rows), 0.0) if loss_type == "kto" else 0.0
    sig = torch.sigmoid
    losses, chosen, rejected = [], [], []
    for i, r in enumerate(rows):
        lr = pol[i] - rf[i]
        if r[3]:
            losses.append(wd * (1 - sig(beta * ((lr - kl) if loss_type == "kto" else lr))))
            chosen.append(i)
        else:
            losses.append(wu * ((1 - sig(beta * (kl - lr))) if loss_type == "kto" else sig(beta * lr)))
            rejected.append(i)
    rewards = [float(beta * (pol[i] - rf[i]).detach()) for i in range(len(rows))]
    pol = [float(x.detach()) for x in pol]
    mean = lambda idx, v: sum(v[i] for i in idx) / len(idx)  # noqa: E731
    return {"loss": sum(losses) / len(rows), "kl": float(kl), "rewards/chosen": mean(chosen, rewards),
            "rewards/rejected": mean(rejected, rewards), "logps/chosen": mean(chosen, pol),
            "logps/rejected": mean(rejected, pol),
            "rewards/margins": mean(chosen, rewards) - mean(rejected, rewards)}


def value(metric):
    s, c = metric
    return float(s) / float(c)


def run_loss(loss, policy, ref, batch, ctx=None):
    with torch.no_grad():  # as the engine calls it
        reference = loss.reference(ref, batch)
    out = loss(policy, batch, ref=reference, ctx=ctx)
    return out, out.normalized({u: float(c) for u, c in loss.counts(batch).items()})


@pytest.mark.parametrize("loss_type,wd,wu", [("kto", 1.0, 1.0), ("kto", 1.33, 0.7), ("apo_zero_unpaired", 1.0, 2.0)])
def test_loss_and_metrics_equal_a_float64_reference(loss_type, wd, wu):
    policy, ref = Bigram(11, seed=0), Bigram(11, seed=1)
    loss = KTOLoss(KTOConfig(beta=0.3, loss_type=loss_type, desirable_weight=wd, undesirable_weight=wu))
    out, total = run_loss(loss, policy, ref, batch_of(ROWS))
    table64 = policy.table.detach().double().requires_grad_()
    expected = hand(table64, ref, ROWS, 0.3, loss_type, wd, wu)
    assert float(total.detach()) == pytest.approx(float(expected["loss"].detach()), rel=1e-6)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert value(out.metrics[name]) == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert out.metrics["rewards/chosen"][1] == 2 and out.metrics["rewards/rejected"][1] == 3
    total.backward()
    expected["loss"].backward()  # the KL estimate is a constant: no gradient flows through it
    assert policy.table.grad.abs().sum() > 0 and ref.table.grad is None
    assert torch.allclose(policy.table.grad.double(), table64.grad, atol=1e-7)


def test_kl_is_clamped_at_zero():
    policy = Bigram(11, seed=0)
    ref = Bigram(11, seed=0)
    with torch.no_grad():  # the reference puts more mass than the policy on every KL completion: estimate < 0
        ref.table[:, [2, 5, 6, 7, 9]] += 3.0
    loss = KTOLoss(KTOConfig(beta=0.5))
    out, total = run_loss(loss, policy, ref, batch_of(ROWS))
    assert hand(policy, ref, ROWS, 0.5, "kto", 1, 1)["kl"] == 0.0  # clamped
    assert float(hand(policy, ref, ROWS, 0.5, "kto", 1, 1,
                      kl=0.0)["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    assert value(out.metrics["kl"]) == 0.0


class TwoProcesses:
    """A StepContext stand-in for one of two processes: the k-th reduce adds the other process's k-th tensor
    (recorded by a first run of that process)."""

    def __init__(self, index, other=None):
        self.num_processes, self.process_index, self.other, self.seen = 2, index, other, []

    def reduce(self, tensor, op="sum"):
        self.seen.append(tensor.detach().clone())
        if self.other is None:
            return tensor.detach().clone()
        total = tensor.detach() + self.other[len(self.seen) - 1]
        return total / 2 if op == "mean" else total


def test_kl_estimate_is_the_mean_over_processes_of_each_process_batch_mean():
    policy, ref = Bigram(11, seed=29), Bigram(11, seed=129)
    loss = KTOLoss(KTOConfig(beta=0.2))
    a, b = ROWS[:2], ROWS[2:]  # batches of 2 and 3 rows: mean of means differs from the global mean
    record_a, record_b = TwoProcesses(0), TwoProcesses(1)
    run_loss(loss, policy, ref, batch_of(a), record_a)
    run_loss(loss, policy, ref, batch_of(b), record_b)
    out_a, total_a = run_loss(loss, policy, ref, batch_of(a), TwoProcesses(0, record_b.seen))
    out_b, total_b = run_loss(loss, policy, ref, batch_of(b), TwoProcesses(1, record_a.seen))
    local = [batch_kl(policy, ref, rows) for rows in (a, b)]
    kl = (local[0] + local[1]) / 2
    assert kl > 0 and abs(kl - batch_kl(policy, ref,
                                        ROWS)) > 0.1 and value(out_a.metrics["kl"]) == pytest.approx(kl, rel=1e-5)
    assert out_b.metrics["kl"][1] == 0  # counted once, on the main process
    assert float(total_a.detach()) == pytest.approx(float(hand(policy, ref, a, 0.2, "kto", 1, 1,
                                                               kl=kl)["loss"].detach()), rel=1e-6)
    assert float(total_b.detach()) == pytest.approx(float(hand(policy, ref, b, 0.2, "kto", 1, 1,
                                                               kl=kl)["loss"].detach()), rel=1e-6)
    # the batch margin is over both processes' rows: chosen mean minus rejected mean of all five
    assert value(out_a.metrics["rewards/margins"]) == pytest.approx(hand(policy, ref, ROWS, 0.2, "kto", 1,
                                                                         1)["rewards/margins"], rel=1e-5)


@pytest.mark.parametrize("loss_type, lora", [("kto", False), ("apo_zero_unpaired", False), ("kto", True)])
@pytest.mark.parametrize("chunk", [1, 3, 1024])  # 1: every row longer than a chunk; 1024: the batch in one chunk
def test_fused_head_equals_the_plain_path(loss_type, lora, chunk):
    """In training the chunked path runs the fused head (whole rows per chunk, gradients computed in the forward):
    the loss, every metric and every parameter's gradient equal the plain path's full logits."""
    from alignkit.testing import tiny_model

    batch = batch_of(ROWS)
    results = []
    for implementation in ("chunked", "plain"):
        model, ref = tiny_model(seed=4, tie_word_embeddings=False), tiny_model(seed=5)
        if lora:  # adapters on the head too: their gradients come from the fused head's forward
            import peft

            torch.manual_seed(0)
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                               init_lora_weights=False))
        loss = KTOLoss(KTOConfig(beta=0.3, loss_type=loss_type, loss_implementation=implementation,
                                 logits_chunk_size=chunk, desirable_weight=1.3, undesirable_weight=0.8))
        loss.prepare_model(model)
        out, total = run_loss(loss, model, ref, batch)
        total.backward()
        results.append((float(total.detach()), {k: value(v) for k, v in out.metrics.items() if v[1]},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, m1, g1), (l2, m2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6) and m1.keys() == m2.keys()
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-6), k
    assert g1.keys() == g2.keys() and g1
    for name in g2:
        error = (g1[name] - g2[name]).norm() / g2[name].norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"


def test_bad_config_is_a_one_line_error():
    with pytest.raises(alignkit.ConfigError, match="method.loss_type.*'kto'.*'apo_zero_unpaired'"):
        alignkit.load_config("kto", {"method": {"loss_type": "sigmoid"}}, plugins=pm())
    with pytest.raises(alignkit.ConfigError, match="method.desirable_weight"):
        alignkit.load_config("kto", {"method": {"desirable_weight": 0}}, plugins=pm())


def pm():
    from alignkit.testing import plugin_manager

    return plugin_manager(alignkit_kto)


def formatter(**config):
    method = alignkit.get_method("kto", pm())
    return method.formatter(method.config(**config), tiny_tokenizer())


def flat(results):
    return [x for r in results for x in (r if isinstance(r, list) else [r])]


def test_paired_rows_become_two_examples_and_kl_pairs_rotate_in_trl_order():
    f = formatter()
    rows = [{"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"},
            {"prompt": "sort: 4 3 =", "chosen": " 3 4", "rejected": " 4 3"}]
    examples = [x.features for x in flat(f.format_batch(rows))]
    tok = tiny_tokenizer()
    # TRL's unpaired order: chosen0, chosen1, rejected0, rejected1; each gets its predecessor's completion
    assert [(tok.decode(x["completion_input_ids"]), x["label"]) for x in examples] == [
        ("sort: 2 1 = 1 2</s>", True), ("sort: 4 3 = 3 4</s>", True),
        ("sort: 2 1 = 2 1</s>", False), ("sort: 4 3 = 4 3</s>", False)]
    for i, x in enumerate(examples):
        prev = examples[i - 1]
        prev_prompt = len(prev["prompt_input_ids"])
        assert x["KL_completion_input_ids"] == x["prompt_input_ids"] + prev["completion_input_ids"][prev_prompt:]
        assert x["KL_completion_labels"][len(x["prompt_input_ids"]):] == prev["completion_labels"][prev_prompt:]


def test_unpaired_rows_and_bad_rows():
    out = formatter().format_batch([{"prompt": "a", "completion": " b", "label": True},
                                    {"prompt": "a", "completion": " c"},
                                    {"prompt": "a", "completion": " c", "label": "yes"}])
    assert out[0][0].features["label"] is True
    assert "missing column 'label'" in str(out[1]) and "'label' must be true or false" in str(out[2])


def test_batch_pairing_rotates_the_batch_own_completions():
    rotated = [(p, c, ROWS[i - 1][1], label) for i, (p, c, _, label) in enumerate(ROWS)]
    fixed = batch_of(rotated)
    batch = {k: v for k, v in fixed.items() if not k.startswith("KL_")}
    policy, ref = Bigram(11, seed=6), Bigram(11, seed=7)
    out_fixed, total_fixed = run_loss(KTOLoss(KTOConfig()), policy, ref, fixed)
    out_batch, total_batch = run_loss(KTOLoss(KTOConfig(kl_pairing="batch")), policy, ref, batch)
    assert float(total_batch.detach()) == pytest.approx(float(total_fixed.detach()), rel=1e-6)
    assert value(out_batch.metrics["kl"]) == pytest.approx(value(out_fixed.metrics["kl"]), rel=1e-6)
    with pytest.raises(alignkit.DataError, match="kl_pairing=batch"):  # no pairs from the formatter
        run_loss(KTOLoss(KTOConfig()), policy, ref, batch)


def test_precompute_is_refused_when_the_pairs_depend_on_the_batching():
    with pytest.raises(alignkit.ConfigError,
                       match="^method.precompute_ref_log_probs=true needs method.kl_pairing=fixed"):
        alignkit.load_config("kto", {"method": {"precompute_ref_log_probs": True, "kl_pairing": "batch"}}, plugins=pm())
    cfg, _ = alignkit.load_config("kto", {"method": {"precompute_ref_log_probs": True, "kl_pairing": "batch",
                                                     "loss_type": "apo_zero_unpaired"}}, plugins=pm())  # no KL term
    assert cfg.method.precompute_ref_log_probs


# ---- through the engine ----------------------------------------------------------------------------

TRL_METRICS = {"loss", "kl", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "num_tokens"}  # TRL 1.16's


def test_trains_on_the_demo_data_with_trl_metric_names(tmp_path):
    result = alignkit.run("kto", fast(tmp_path, max_steps=6, learning_rate=3e-3, eval_on_start=True), plugins=pm())
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert {f"eval_{k}" for k in TRL_METRICS} <= set(evals[-1])
    assert TRL_METRICS <= set(rows[-2] if "eval_loss" in rows[-1] else rows[-1])
    # before training the policy is its reference: every logratio and the KL are 0, every loss 1 - sigmoid(0)
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-7) and evals[0]["eval_kl"] == 0
    assert evals[0]["eval_rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]
    assert "arXiv:2402.01306" in (result.output_dir / "README.md").read_text()
    train = [r for r in rows if "loss" in r]  # num_tokens: a running total of the trained examples' input tokens
    assert evals[0]["eval_num_tokens"] == 0 and evals[-1]["eval_num_tokens"] == train[-1]["num_tokens"] > 0
    assert [r["num_tokens"] for r in train] == sorted(r["num_tokens"] for r in train)


def test_paired_data_is_unpaired_and_trains(tmp_path):
    import alignkit_orpo
    from alignkit.testing import plugin_manager

    config = fast(tmp_path, max_steps=2)
    config["data"]["train"] = "builtin:sort"  # ORPO's paired demo data
    result = alignkit.run("kto", config, plugins=plugin_manager(alignkit_orpo, alignkit_kto))
    assert result.global_step == 2
    import math

    assert (math.isfinite(result.metrics["eval_rewards/chosen"])
            and math.isfinite(result.metrics["eval_rewards/rejected"]))


def test_precomputed_reference_gives_the_same_run(tmp_path):
    runs = [alignkit.run("kto", fast(tmp_path / name, max_steps=3, learning_rate=3e-3), plugins=pm(),
                         **{"method.precompute_ref_log_probs": pre}) for name, pre in (("live", False), ("pre", True))]
    live, pre = (read_jsonl(r.output_dir / "metrics.jsonl") for r in runs)
    assert len(live) == len(pre)
    for a, b in zip(live, pre):
        assert a.keys() == b.keys()
        for k in a:  # NaN: a window whose batches never held both labels has no margin
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6, nan_ok=True), k


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path):
    from alignkit.engine.loop import Engine
    from alignkit.testing import tiny_model

    cfg, method = alignkit.load_config("kto", fast(tmp_path, max_steps=2, learning_rate=1e-2),
                                       {"model.peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}, plugins=pm())
    engine = Engine(cfg, method, pm(), model=tiny_model(seed=3)).load()
    assert engine.reference.model is None  # no second copy
    engine.train()
    data = engine.data.formatted(need_train=True)["train"]
    batch = engine.formatter.collate([data[i] for i in range(4)])
    ref = engine.reference(engine.model, dict(batch))
    base = engine.loss.reference(tiny_model(seed=3), batch)
    assert torch.allclose(ref["logps"], base["logps"], atol=1e-5) and torch.allclose(ref["KL_logps"], base["KL_logps"],
                                                                                     atol=1e-5)
    with torch.no_grad():
        trained = engine.loss.reference(engine.model, batch)
    assert not torch.allclose(trained["logps"], base["logps"], atol=1e-5)  # the adapters did learn


def test_default_job_learns_offline(tmp_path):
    """The README's `alignkit run --method kto`, as a user runs it: held-out margins > 0 and rising."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "alignkit"
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_figures

    env = readme_figures.demo_env({**os.environ, "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-kto"})  # its threads
    proc = subprocess.run([exe, "run", "--method", "kto"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)  # generous: wall time grows with a shared machine's load
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "outputs" / "kto" / "metrics.jsonl")
    margins = [r["eval_rewards/margins"] for r in rows if "eval_loss" in r]
    assert rows[0]["step"] == 0 and len(margins) >= 4
    assert margins[-1] > 0 and margins[-1] > margins[len(margins) // 2] > margins[0]
    assert json.loads(proc.stdout)["eval_rewards/margins"] == margins[-1]
    readme_figures.assert_demo_matches("kto", tmp_path / "outputs" / "kto" / "metrics.jsonl")  # the README's figures


def test_eval_metrics_and_gradients_equal_trl(tmp_path, monkeypatch):
    """TRL 1.x's KTOTrainer run for real (trl is in the test extra) on three cases of the comparison script:
    unpaired with weights, paired rows unpaired, conversational; eval metrics and one step's gradients."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_kto_with_trl as cmp

    cases = ("kto-weights", "kto-paired", "kto-conversational")
    monkeypatch.setattr(cmp, "CASES", {k: cmp.CASES[k] for k in cases})
    monkeypatch.setattr(cmp, "GRADIENT_CASES", ("kto-paired",))
    cmp.make_inputs(tmp_path)
    _, worst, _ = cmp.compare(cmp.alignkit_side(tmp_path), cmp.trl_side(tmp_path))
    assert worst <= 1e-5
    _, grad_worst = cmp.compare_gradients(tmp_path)
    assert grad_worst <= 1e-5
