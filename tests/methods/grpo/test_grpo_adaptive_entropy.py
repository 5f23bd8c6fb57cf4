"""Adaptive entropy control (method.use_adaptive_entropy, TRL 1.16's GRPOConfig field, Skywork-OR1): the
coefficient moves by entropy_coef_delta after each optimizer step (up when the step's mean token entropy over all
processes is <= entropy_target, down otherwise, within [entropy_coef_min, entropy_coef_max]) and the bonus applies
only while the last step's entropy was <= the target. The controller is loss state (Loss.after_step /
state_dict): logged as entropy_coef, saved in each checkpoint, restored on resume."""

import json
import shutil
import sys

import alignkit_grpo
import pytest
import torch
from alignkit_grpo.config import GRPOConfig
from alignkit_grpo.loss import GRPOLoss
from safetensors.torch import load_file

import alignkit
from alignkit.plugin.context import StepContext
from alignkit.testing import plugin_manager, tiny_model, tiny_tokenizer
from helpers import BENCHMARKS, read_jsonl, refused

sys.path.insert(0, str(BENCHMARKS))
import compare_grpo_with_trl as cmp  # noqa: E402


def batch_of(g):
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 5, 6]])
    return {"prompt_ids": prompt, "prompt_mask": (prompt != 0).long(),
            "completion_ids": torch.randint(3, 300, (3, 4), generator=g),
            "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]),
            "advantages": torch.tensor([0.8, -1.1, 0.3])}


def adaptive(**kw):
    return GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_target=0.5,
                      entropy_coef_max=0.12, logits_chunk_size=3, max_completion_length=4, temperature=0.7, **kw)


def test_the_controller_follows_trls_rules():
    loss, ctx = GRPOLoss(adaptive()), StepContext(True, 0, 0, 1)
    assert loss.applied_entropy_coef() == 0.0  # no step measured yet: TRL starts from an infinite entropy
    assert loss.after_step({"entropy": (0.8, 2.0)}, ctx) == {"entropy_coef": (pytest.approx(0.12), 1)}  # 0.4: up
    assert loss.applied_entropy_coef() == pytest.approx(0.12)  # capped at entropy_coef_max
    loss.after_step({"entropy": (3.0, 2.0)}, ctx)  # 1.5 > 0.5: down, and no bonus next step
    assert (loss.entropy_coef, loss.applied_entropy_coef()) == (pytest.approx(0.07), 0.0)
    for _ in range(3):
        loss.after_step({"entropy": (3.0, 2.0)}, ctx)
    assert loss.entropy_coef == 0.0  # floored at entropy_coef_min
    state = loss.state_dict()
    again = GRPOLoss(adaptive())
    again.load_state_dict(json.loads(json.dumps(state)))
    assert (again.entropy_coef, again.last_entropy) == (loss.entropy_coef, loss.last_entropy) == (0.0, 1.5)
    fixed = GRPOLoss(GRPOConfig(entropy_coef=0.1))
    assert fixed.after_step({"entropy": (0.8, 2.0)}, ctx) is None and fixed.state_dict() == {}


@pytest.mark.parametrize("last_entropy", [0.3, 0.9])
def test_the_bonus_applied_is_the_fixed_bonus_at_the_current_coefficient_or_none(last_entropy):
    """Gated on (0.3 <= target 0.5): loss and gradients equal a fixed entropy_coef at the controller's coefficient;
    gated off (0.9): equal no bonus at all."""
    g = torch.Generator().manual_seed(5)
    batch = batch_of(g)
    results = []
    for cfg in (adaptive(), GRPOConfig(entropy_coef=0.1 if last_entropy < 0.5 else 0.0, logits_chunk_size=3,
                                       max_completion_length=4, temperature=0.7)):
        model = tiny_model(seed=4, tie_word_embeddings=False)
        loss = GRPOLoss(cfg)
        if cfg.use_adaptive_entropy:
            loss.last_entropy = last_entropy
        loss.prepare_model(model)
        totals = {"tokens": 9.0, "micro_batches": 1.0}
        out = loss(model, batch)
        out.normalized(totals).backward()
        results.append((float(out.normalized(totals).detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-6) and ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-8)


def settings(out, **train):
    return {"method": {"num_generations": 4, "max_completion_length": 6, "sft_warmup_steps": 0,
                       "reward_funcs": ["sort-order"], "use_adaptive_entropy": True, "entropy_coef": 0.01,
                       "entropy_coef_delta": 0.02, "entropy_target": 100.0},
            "data": {"max_train_samples": 16, "max_eval_samples": 4},
            "train": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 1,
                      "save_steps": 1, "eval_steps": None, "eval_on_start": False, "disable_tqdm": True,
                      "plots": False, "learning_rate": 1e-3, **train}}


def test_through_the_engine_logged_checkpointed_and_resumed_exactly(tmp_path):
    """Entropy always under the (high) target: the coefficient rises by delta each step, as logged; the checkpoint
    keeps it, and a run resumed from checkpoint-2 ends with the same weights and coefficients as one never stopped."""
    pm = plugin_manager(alignkit_grpo)
    whole = alignkit.run("grpo", settings(tmp_path / "whole"), plugins=pm).output_dir
    coefs = [r["entropy_coef"] for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    assert coefs == pytest.approx([0.03, 0.05, 0.07, 0.09])
    state = json.loads((whole / "checkpoints" / "checkpoint-2" / "alignkit_state.json").read_text())
    assert state["loss_state"]["entropy_coef"] == pytest.approx(0.05)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "checkpoint-3")
    (cut / "model.safetensors").unlink()
    alignkit.run("grpo", settings(cut, resume_from_checkpoint="auto"), plugins=pm)
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["entropy_coef"] for r in read_jsonl(cut / "metrics.jsonl") if "loss" in r][-2:] == coefs[-2:]


@pytest.mark.parametrize(("args", "needle"), [
    (["method.use_adaptive_entropy=true", "method.top_entropy_quantile=0.5"], "needs a token-local objective"),
    (["method.entropy_coef_min=0.5", "method.entropy_coef_max=0.1"], "method.entropy_coef_min=0.5 is above"),
])
def test_refused_in_one_line_before_anything_is_written(tmp_path, args, needle):
    out = tmp_path / "out"
    assert needle in refused("run", "--method", "grpo", *args, f"train.output_dir={out}", written=out)


def test_the_trl_facade_passes_trls_fields():
    from alignkit_grpo.trl import GRPOConfig as TRLStyle

    out = TRLStyle(output_dir="x", use_adaptive_entropy=True, entropy_coef=0.02, entropy_target=0.3,
                   entropy_coef_delta=0.01, use_cpu=True, report_to="none").to_alignkit()
    assert (out["method.use_adaptive_entropy"], out["method.entropy_coef"], out["method.entropy_target"],
            out["method.entropy_coef_delta"]) == (True, 0.02, 0.3, 0.01)


@pytest.mark.parametrize("target", cmp.ADAPTIVE_TARGETS)
def test_the_controller_loss_and_gradients_equal_trls_over_four_steps(target, tmp_path):
    """TRL's GRPOTrainer with use_adaptive_entropy, its own _compute_loss step after step (benchmarks/
    compare_grpo_with_trl.py): the same loss, gradients and coefficient at every step."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    tiny_model().save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    r = cmp.compare_adaptive_entropy(str(tmp_path / "model"), tok, str(tmp_path / "trl"), target)
    assert r["loss_rel_max"] <= 1e-5 and r["grad_rel_max"] <= 1e-5 and r["coef_abs_max"] <= 1e-12, r
    coefs = [s["trl_coef"] for s in r["steps"]]
    assert len(set(coefs)) > 1 or target == 100.0  # the controller moved (100: it rose, then sat at the max)


def test_the_facade_shows_the_moving_coefficient_as_trls_trainer_does(tmp_path):
    """TRL's tests read trainer.entropy_coef after training: under adaptive control it rose by delta per step."""
    from alignkit_grpo.rewards import sort_order
    from alignkit_trl import DatasetMixtureConfig, GRPOConfig, GRPOTrainer, get_dataset

    prompts = get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-prompts"}]))["train"]
    args = GRPOConfig(output_dir=str(tmp_path / "o"), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.005,
                      entropy_target=100.0, report_to="none", bf16=False, use_cpu=True, save_strategy="no")
    trainer = GRPOTrainer("builtin:tiny", reward_funcs=sort_order, args=args, train_dataset=prompts)
    assert trainer.entropy_coef == 0.01
    trainer.train()
    assert trainer.entropy_coef == pytest.approx(0.01 + 0.005 * trainer.state.global_step)
