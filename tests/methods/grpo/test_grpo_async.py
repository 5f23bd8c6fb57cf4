"""Async rollouts with bounded staleness (issue 22, item 2): the next k steps' completions are sampled by a copy of
the policy in a worker thread while the current step trains. A run is reproducible for a given k: SIGKILL and
resume give bit-identical weights (the rollouts requested but not trained are kept in the checkpoint), two
processes match one."""

import sys
from pathlib import Path

import pytest
import torch
from test_grpo_engine import ENV, cli

from helpers import free_port, kill_at_checkpoint_then_resume, read_jsonl


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_staleness_one_trains_on_the_previous_policys_samples(tmp_path):
    args = ["train.max_steps=4", "train.save_steps=null", "train.per_device_train_batch_size=4"]
    cli(tmp_path / "sync", *args)
    cli(tmp_path / "one", *args, "method.max_staleness=1")
    cli(tmp_path / "frozen_sync", *args, "train.learning_rate=1e-30")
    cli(tmp_path / "frozen_one", *args, "train.learning_rate=1e-30", "method.max_staleness=1")
    # the weights never change (updates far below float32 resolution): a stale copy samples what the policy would
    frozen_one, frozen_sync = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("frozen_one", "frozen_sync"))
    # the same completions, rewards and metrics; the loss differs only by importance weights within 1e-5 of 1
    assert [{k: v for k, v in r.items() if not k.startswith("sampling/")} for r in frozen_one] == \
        [pytest.approx(r, rel=1e-5, abs=1e-7) for r in frozen_sync]
    assert all(r["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-5)
               for r in frozen_one if "loss" in r)
    sync, one = losses(tmp_path / "sync"), losses(tmp_path / "one")
    assert one[0] == pytest.approx(sync[0], rel=1e-6)  # step 1 trains on the starting policy's samples either way
    assert one[1:] != sync[1:]  # later steps train on samples of the policy one step behind
    ratios = [r["sampling/importance_sampling_ratio/mean"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl")
              if "loss" in r]
    assert ratios[0] == pytest.approx(1.0, abs=1e-4)  # step 1's samples come from the very weights that train
    assert any(abs(r - 1.0) > 1e-4 for r in ratios[1:])  # later ones from the copy one step behind: weighted
    assert (tmp_path / "one" / "model.safetensors").is_file()


def test_sigkill_then_resume_with_rollouts_ahead_gives_bit_identical_weights(tmp_path):
    args = ["train.max_steps=6", "train.save_steps=2", "train.per_device_train_batch_size=4",
            "method.max_staleness=2"]
    kill_at_checkpoint_then_resume(tmp_path, cli, args,
                                   after_kill=lambda ckpt: (ckpt / "rollouts-ahead-0.pt").is_file() or pytest.fail(
                                       f"{ckpt} keeps no rollouts requested ahead"))


@pytest.mark.slow  # two torchrun processes and one run: about 40 s on 2 CPU cores
def test_two_processes_with_rollouts_ahead_match_one(tmp_path):
    args = ["train.max_steps=3", "train.save_steps=null", "method.scale_rewards=batch", "method.max_staleness=1"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    cli(tmp_path / "two", *args, "train.per_device_train_batch_size=2", launcher=torchrun)
    cli(tmp_path / "one", *args, "train.per_device_train_batch_size=4")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "entropy", "eval_reward"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_with_two_passes_per_rollout_the_old_log_probs_are_the_policys_at_the_first_pass(tmp_path):
    """max_staleness=1 with num_iterations=2: each rollout, sampled ahead, trains two steps; the old log-probs are
    the policy's as its first pass starts (so the first pass's ratio is 1 and the second's moves), the importance
    weights take the copy that sampled to them. With frozen weights it all equals the synchronous run."""
    args = ["train.max_steps=6", "train.save_steps=null", "train.per_device_train_batch_size=4",
            "method.num_iterations=2"]
    cli(tmp_path / "frozen_sync", *args, "train.learning_rate=1e-30")
    cli(tmp_path / "frozen_one", *args, "train.learning_rate=1e-30", "method.max_staleness=1")
    frozen_one, frozen_sync = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("frozen_one", "frozen_sync"))
    assert [{k: v for k, v in r.items() if not k.startswith("sampling/")} for r in frozen_one] == \
        [pytest.approx(r, rel=1e-5, abs=1e-7) for r in frozen_sync]
    cli(tmp_path / "one", *args, "method.max_staleness=1")
    rows = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    firsts, seconds = rows[0::2], rows[1::2]  # steps 1, 3, 5 start a rollout; 2, 4, 6 are its second pass
    assert all(r["clip_ratio/region_mean"] == 0.0 for r in firsts)  # ratio 1 to the old log-probs: nothing clipped
    ratios = [r["sampling/importance_sampling_ratio/mean"] for r in rows]
    assert ratios[0] == pytest.approx(1.0, abs=1e-4)  # step 1: sampled by the very weights that train
    assert any(abs(r["sampling/importance_sampling_ratio/mean"] - 1.0) > 1e-4 for r in firsts[1:])  # stale copies
    assert [r["sampling/importance_sampling_ratio/mean"] for r in seconds] == \
        pytest.approx([r["sampling/importance_sampling_ratio/mean"] for r in firsts], rel=1e-6)  # fixed per rollout
    sync = losses(tmp_path / "frozen_sync")
    assert len(sync) == 6 and (tmp_path / "one" / "model.safetensors").is_file()


def test_sigkill_then_resume_with_rollouts_ahead_and_two_passes_gives_bit_identical_weights(tmp_path):
    args = ["train.max_steps=8", "train.save_steps=2", "train.per_device_train_batch_size=4",
            "method.max_staleness=1", "method.num_iterations=2"]
    kill_at_checkpoint_then_resume(tmp_path, cli, args,
                                   after_kill=lambda ckpt: (ckpt / "rollouts-ahead-0.pt").is_file() or pytest.fail(
                                       f"{ckpt} keeps no rollouts requested ahead"))


@pytest.mark.parametrize(("extra", "said"), [
    (["method.generation_backend=vllm"], "method.max_staleness=1 samples with transformers' generate"),
])
def test_settings_async_rollouts_cannot_run_with_are_refused_in_one_line_before_any_write(tmp_path, extra, said):
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "alignkit", "-q", "run", "--method", "grpo", "method.max_staleness=1",
                           *extra, f"train.output_dir={out}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], lines
    assert not out.exists()


def trl_weights(old, sampled, mask, mode, clip_min, clip_max):
    """TRL 1.16's vllm_importance_sampling ratio, written from its documentation: the per-token difference of
    log-probs (or its sum over the completion), exponentiated, clipped (truncate) or zeroed outside (mask)."""
    diff = (old - sampled) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -float("inf")
    return torch.where((ratio < low) | (ratio > clip_max), torch.zeros_like(ratio), ratio)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_the_importance_weights_are_trls(mode, clip_min):
    from alignkit_grpo import GRPOConfig
    from alignkit_grpo.objective import sampling_correction

    g = torch.Generator().manual_seed(0)
    logps, sampled = -torch.rand(4, 5, generator=g) * 3, -torch.rand(4, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    cfg = GRPOConfig(max_staleness=1, importance_sampling_mode=mode, importance_sampling_clip_min=clip_min,
                     importance_sampling_clip_max=2.0)
    got = sampling_correction(logps, sampled, mask, cfg)
    want = trl_weights(logps, sampled, mask, mode, clip_min, 2.0)
    torch.testing.assert_close(got, want)
    assert (got == 0).any() if mode.endswith("mask") else (got == 2.0).any()  # the bound bites in this data


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_the_fused_head_applies_token_level_weights_as_the_checkpointed_path(loss_type):
    from alignkit_grpo import GRPOConfig, GRPOLoss

    from alignkit.testing import tiny_model

    g = torch.Generator().manual_seed(2)
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 4, 5, 6]])
    batch = {"prompt_ids": prompt, "prompt_mask": (prompt != 0).long(),
             "completion_ids": torch.randint(3, 300, (3, 4), generator=g),
             "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]),
             "advantages": torch.tensor([0.8, -1.1, 0.3])}
    cfg = GRPOConfig(loss_type=loss_type, logits_chunk_size=3, max_completion_length=4, max_staleness=1,
                     importance_sampling_mode="token_truncate", importance_sampling_clip_max=1.5)
    results = []
    for fused in (True, False, None):
        model = tiny_model(seed=3, tie_word_embeddings=False)
        loss = GRPOLoss(cfg)
        loss.prepare_model(model)
        with torch.no_grad():  # the samples came from a copy whose log-probs differ: some weights hit the cap
            current, _ = loss._logps(model, batch)
        batch["sampling_logps"] = current - torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
        if fused is None:  # no correction: the weights must change the gradients
            batch.pop("sampling_logps")
        if not fused:
            loss.head = None
        out = loss(model, batch)
        sum(out.terms.values()).backward()
        results.append((float(sum(out.terms.values()).detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                         if p.grad is not None}))
    (fused_loss, fused_grads), (plain_loss, plain_grads), (_, uncorrected) = results
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-6)
    for name in plain_grads:
        error = (fused_grads[name] - plain_grads[name]).norm() / plain_grads[name].norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{name}: relative gradient difference {error:.2e}"
    assert any(not torch.allclose(plain_grads[n], uncorrected[n]) for n in plain_grads)
