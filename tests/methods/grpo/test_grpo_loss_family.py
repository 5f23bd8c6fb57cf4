"""TRL 1.16's GRPO loss family beyond grpo/dapo/dr_grpo: bnpo, cispo, sapo, luspo, vespo, sequence-level ratios
(GSPO), two-sided clipping (delta), entropy-based token masking and the off-policy sequence mask. Loss, gradients
and metrics against TRL's own `_compute_loss` on fixed completions (benchmarks/compare_grpo_with_trl.py), the
fused head against the checkpointed path, the refusals of knobs a loss type would ignore, and a short run."""

import sys
import threading

import alignkit_grpo
import pytest
import torch
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.loss import GRPOLoss, gather_over_processes, reduce_terms

import alignkit
from alignkit.testing import plugin_manager, tiny_model, tiny_tokenizer
from helpers import BENCHMARKS, read_jsonl, refused

sys.path.insert(0, str(BENCHMARKS))
import compare_grpo_with_trl as cmp  # noqa: E402

SEQ, CLIP = cmp.SEQ, cmp.CLIP
#: a few of the benchmark's family cases: each loss type, each knob (label -> GRPOConfig keywords)
CASES = {
    "bnpo": dict(loss_type="bnpo", beta=0.04, num_iterations=2, **CLIP),
    "cispo-capped": dict(loss_type="cispo", epsilon_high=1.02, num_iterations=2, mask_truncated_completions=True),
    "sapo-temperatures": dict(loss_type="sapo", num_iterations=2, sapo_temperature_pos=0.5, sapo_temperature_neg=8.0),
    "luspo": dict(loss_type="luspo", beta=0.04, num_iterations=2, **SEQ, epsilon=0.01, epsilon_high=0.02),
    "vespo-gamma": dict(loss_type="vespo", num_iterations=2, vespo_k_pos=1.0, vespo_lambda_pos=8.0, vespo_k_neg=6.0,
                        vespo_lambda_neg=0.5),
    "gspo": dict(loss_type="grpo", beta=0.04, num_iterations=2, **SEQ, epsilon=0.01, epsilon_high=0.02),
    "delta": dict(loss_type="dapo", num_iterations=2, epsilon=0.02, epsilon_high=0.03, delta=1.05),
    "top-entropy": dict(loss_type="dapo", num_iterations=2, top_entropy_quantile=0.2, **CLIP),
    "off-policy-mask": dict(loss_type="grpo", beta=0.04, num_iterations=2, off_policy_mask_threshold=0.005,
                            top_entropy_quantile=0.5, **CLIP),
    "entropy-bonus": dict(loss_type="bnpo", num_iterations=2, entropy_coef=-0.1, delta=1.05, epsilon=0.02,
                          epsilon_high=0.03),
    "entropy-bonus-kl": dict(loss_type="grpo", beta=0.04, num_iterations=2, entropy_coef=0.05, **CLIP),
}
#: the metric each loss type logs beside entropy (TRL's name)
OWN_METRIC = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean", "sapo": None}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo-family") / "model"
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tiny_model().save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@pytest.mark.parametrize("label", list(CASES))
def test_loss_gradients_and_metrics_equal_trl(label, saved_model, tmp_path):
    path, tok = saved_model
    cfg = GRPOConfig(num_generations=cmp.N_GEN, max_completion_length=cmp.MAX_NEW, temperature=0.7, **CASES[label])
    row = cmp.compare(cfg, str(path), tok, str(tmp_path / "trl"))
    assert row["loss_rel"] <= 1e-5 and row["grad_rel_max"] <= 1e-5, row
    assert row["metrics_rel_max"] <= 1e-5, row["metrics"]
    metric = OWN_METRIC.get(cfg.loss_type, "clip_ratio/region_mean")
    assert "entropy" in row["metrics"] and (metric is None or metric in row["metrics"]), row["metrics"]
    if cfg.entropy_coef:
        assert {"policy_loss", "entropy_coef"} <= row["metrics"].keys(), row["metrics"]
    if row["knobs"]:  # the knobs change the loss on these inputs: the comparison covers them
        assert row["knob_effect"] > 1e-3, row


def batch_of(g, rows=3, width=4):
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 5, 6]])[:rows]
    return {"prompt_ids": prompt, "prompt_mask": (prompt != 0).long(),
            "completion_ids": torch.randint(3, 300, (rows, width), generator=g),
            "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])[:rows],
            "advantages": torch.tensor([0.8, -1.1, 0.3])[:rows], "old_logps": -torch.rand(rows, width, generator=g) * 4}


@pytest.mark.parametrize("case", [dict(loss_type="bnpo"), dict(loss_type="cispo", epsilon_high=1.5),
                                  dict(loss_type="sapo"), dict(loss_type="dapo", delta=1.5, beta=0.1),
                                  dict(loss_type="vespo"), dict(loss_type="grpo", **SEQ),
                                  dict(loss_type="dapo", top_entropy_quantile=0.5)])
def test_fused_head_equals_the_checkpointed_path(case):
    """Token-local objectives train on the fused head (gradients in the forward, chunk by chunk); the others need
    whole completions or the whole micro-batch first and take the checkpointed path: the same loss and gradients."""
    g = torch.Generator().manual_seed(2)
    batch = batch_of(g)
    ref = {"logps": -torch.rand(3, 4, generator=g) * 4} if case.get("beta") else None
    cfg = GRPOConfig(logits_chunk_size=3, max_completion_length=4, temperature=0.7, **case)
    results = []
    for fused in (True, False):
        model = tiny_model(seed=3, tie_word_embeddings=False)
        loss = GRPOLoss(cfg)
        loss.prepare_model(model)
        if not fused:
            loss.head = None
        out = loss(model, batch, ref=ref)
        sum(out.terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: float(v) for k, v in out.terms.items()}, grads))
    (terms_a, grads_a), (terms_b, grads_b) = results
    assert terms_a == pytest.approx(terms_b, rel=1e-5, abs=1e-6) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_b:
        error = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_the_entropy_bonus_is_each_micro_batch_mean_within_the_step(loss_type):
    """Within a step of several micro-batches (ctx.totals) the fused term carries the entropy bonus divided by the
    step's micro-batches while the objective keeps its own unit: gradients equal a float64 full-logits reference."""
    g = torch.Generator().manual_seed(5)
    batch = batch_of(g)
    batch.pop("old_logps")  # on-policy: ratio 1, the surrogate's gradient is -A grad log p
    cfg = GRPOConfig(loss_type=loss_type, entropy_coef=0.3, logits_chunk_size=3, max_completion_length=4,
                     temperature=0.7)
    mask = batch["completion_mask"].double()
    unit = {"dapo": "tokens", "grpo": "completions", "bnpo": "micro_batches"}[loss_type]
    totals = {unit: {"tokens": 23.0, "completions": 7.0, "micro_batches": 3.0}[unit], "micro_batches": 3.0}

    class Ctx:
        num_processes, process_index = 1, 0

    Ctx.totals = totals
    grads = []
    for ours in (True, False):
        model = tiny_model(seed=4, tie_word_embeddings=False)
        if ours:
            loss = GRPOLoss(cfg)
            loss.prepare_model(model)
            out = loss(model, batch, ctx=Ctx)
            out.normalized(totals).backward()
        else:
            model = model.double()
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
            logits = model(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]],
                                                                    1)).logits[:, 3:-1] / 0.7
            logprobs = logits.log_softmax(-1)
            lp = logprobs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
            entropy = -(logprobs.exp() * logprobs).sum(-1)
            adv = batch["advantages"].double()[:, None]
            per_token = -torch.exp(lp - lp.detach()) * adv * mask
            policy = {"dapo": per_token.sum(), "bnpo": per_token.sum() / mask.sum(),
                      "grpo": (per_token.sum(-1) / mask.sum(-1)).sum()}[loss_type] / totals[unit]
            (policy - 0.3 * (entropy * mask).sum() / mask.sum() / totals["micro_batches"]).backward()
        grads.append({n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None})
    for name, ref in grads[1].items():
        error = (grads[0][name] - ref).norm() / ref.norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"


def test_bnpo_is_the_mean_of_each_micro_batch_token_mean():
    """TRL's bnpo divides by the tokens of its local batch, then averages over accumulation steps and processes:
    one term per micro-batch, counted once."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    cfg = GRPOConfig(loss_type="bnpo")
    loss, terms, counts = GRPOLoss(cfg), 0.0, 0
    for rows in (slice(0, 2), slice(2, 3)):
        (unit, term), = reduce_terms(per_token[rows], mask[rows], cfg).items()
        terms += float(term)
        counts += loss.counts({"completion_mask": mask[rows], "completion_ids": mask[rows]})[unit]
    assert counts == 2 and terms / counts == pytest.approx(((1 + 2 + 4) / 3 + (7 + 8 + 9) / 3) / 2, rel=1e-12)


def test_entropy_quantile_spans_every_process():
    """top_entropy_quantile makes the loss collective: the entropies are gathered over processes (two threads
    stand in for two processes, their reduce a sum through a barrier)."""
    assert GRPOLoss(GRPOConfig(top_entropy_quantile=0.2)).collective is True
    assert GRPOLoss(GRPOConfig()).collective is False
    barrier, slots = threading.Barrier(2), {}

    def reducer(rank):
        def reduce(t, op="sum"):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce

    class Ctx:
        def __init__(self, rank):
            self.num_processes, self.process_index, self.reduce = 2, rank, reducer(rank)

    values = {0: torch.tensor([3.0, 1.0]), 1: torch.tensor([2.0, 5.0, 4.0])}
    out = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, gather_over_processes(values[r], Ctx(r))))
               for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert out[0].tolist() == out[1].tolist() == [3.0, 1.0, 2.0, 5.0, 4.0]


@pytest.mark.parametrize("args, message", [
    (["method.loss_type=sapo", "method.delta=4"],
     "method.delta is read only by loss_type grpo / bnpo / dr_grpo / dapo / luspo, not sapo"),
    (["method.loss_type=vespo", "method.epsilon_high=0.28"], "method.epsilon_high is read only by loss_type"),
    (["method.loss_type=dapo", "method.sapo_temperature_neg=2"], "method.sapo_temperature_neg is read only by "
                                                                 "loss_type sapo, not dapo"),
    (["method.loss_type=cispo"], "method.epsilon_high must be set with loss_type cispo"),
    (["method.loss_type=cispo", "method.epsilon_high=5", "method.epsilon=0.1"],
     "method.epsilon is read only by loss_type grpo / bnpo / dr_grpo / dapo / luspo, not cispo"),
    (["method.loss_type=luspo"], "method.importance_sampling_level must be 'sequence' with loss_type luspo"),
    (["method.loss_type=vespo", "method.importance_sampling_level=sequence"],
     "method.importance_sampling_level must be 'token' with loss_type vespo"),
    (["method.loss_type=gspo"], "method.loss_type: Input should be 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', "
                                "'sapo', 'luspo' or 'vespo'"),
    (["method.top_entropy_quantile=1.5"], "method.top_entropy_quantile"),
    (["method.entropy_coef=0.01", "method.top_entropy_quantile=0.2"], "method.entropy_coef needs a token-local"),
    (["method.multi_objective_aggregation=normalize_then_sum", "method.scale_rewards=none"],
     "method.scale_rewards=none is ignored with multi_objective_aggregation normalize_then_sum"),
])
def test_a_knob_the_loss_type_ignores_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    line = refused("run", "--method", "grpo", *args, f"train.output_dir={out}", written=out)
    assert message in line, line


@pytest.mark.parametrize("method, logged", [
    ({"loss_type": "luspo", "importance_sampling_level": "sequence", "num_iterations": 2, "top_entropy_quantile": 0.5,
      "off_policy_mask_threshold": 0.01}, "clip_ratio/region_mean"),
    ({"loss_type": "bnpo", "entropy_coef": 0.01}, "policy_loss"),
])
def test_a_short_run_logs_trl_metrics_and_evaluates(tmp_path, method, logged):
    """Two optimizer steps through the engine and an evaluation: luspo (sequence-level ratio, two passes per
    rollout) with the entropy and off-policy masks; bnpo with the entropy bonus (its eval loss without gradient)."""
    method = {"num_generations": 4, "max_completion_length": 6, "sft_warmup_steps": 0, "reward_funcs": ["sort-order"],
              **method}
    result = alignkit.run("grpo", {"method": method, "data": {"max_train_samples": 8, "max_eval_samples": 4},
                                   "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2,
                                             "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                                             "logging_steps": 1, "save_steps": None, "eval_steps": None,
                                             "eval_on_start": True, "disable_tqdm": True, "plots": False}},
                          plugins=plugin_manager(alignkit_grpo))
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert all(logged in r and "entropy" in r for r in train), train
    assert any("eval_loss" in r and torch.isfinite(torch.tensor(r["eval_loss"])) for r in rows), rows


def test_normalize_then_sum_scores_as_trl(saved_model, tmp_path):
    """multi_objective_aggregation=normalize_then_sum (GDPO): each reward function normalised within its group,
    the weighted sum normalised over the step; TRL's own scoring of the same fixed completions (one function
    returning None on a prompt): advantages, reward metrics, loss and gradients."""
    path, tok = saved_model
    row = cmp.compare_scoring(str(path), tok, str(tmp_path / "trl"), "group", "normalize_then_sum")
    assert row["advantage_abs_max"] <= 1e-5 and row["metrics_rel_max"] <= 1e-5, row
    assert row["loss_abs"] <= 1e-5 and row["grad_rel_max"] <= 1e-5, row
    plain = cmp.compare_scoring(str(path), tok, str(tmp_path / "trl-sum"), "group")
    assert plain["advantage_abs_max"] <= 1e-5 and plain["grad_rel_max"] <= 1e-5, plain


@pytest.mark.slow
def test_two_processes_match_one_with_the_entropy_quantile_and_gdpo(tmp_path):
    """The entropy quantile spans the micro-batch on every process and normalize_then_sum the step's completions
    on every process: two processes of 2 prompts equal one of 4 (torchrun; the subprocesses get this PYTHONPATH)."""
    import os
    import subprocess

    from helpers import free_port

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-grpo", "PATH": os.path.dirname(sys.executable),
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))}
    args = ["method.num_generations=4", "method.max_completion_length=8", "data.max_train_samples=48",
            "data.max_eval_samples=8", "train.per_device_eval_batch_size=8", "train.logging_steps=1",
            "train.disable_tqdm=true", "train.plots=false", "train.eval_steps=2", "train.max_steps=2",
            "train.save_steps=null", "method.loss_type=luspo", "method.importance_sampling_level=sequence",
            "method.top_entropy_quantile=0.5", "method.multi_objective_aggregation=normalize_then_sum"]
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    for name, launcher, batch in (("two", torchrun, 2), ("one", [sys.executable], 4)):
        out = tmp_path / name
        proc = subprocess.run([*launcher, "-m", "alignkit", "-q", "run", "--method", "grpo", *args,
                               f"train.per_device_train_batch_size={batch}", f"train.output_dir={out}"],
                              env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] and any("loss" in r for r in one)
    for a, b in zip(one, two):
        for key in ("loss", "reward", "entropy", "clip_ratio/region_mean", "frac_reward_zero_std", "eval_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
