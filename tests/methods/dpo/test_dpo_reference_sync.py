"""TR-DPO's reference sync (method.sync_ref_model): every ref_model_sync_steps optimizer steps the reference becomes
ref_model_mixup_alpha * policy + (1 - alpha) * reference, as TRL's SyncRefModelCallback does; the synced reference is
in each checkpoint, so a run killed and resumed ends bit-identical to one never stopped."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import alignkit
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import fast, read_jsonl, refused


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("policy", 11), ("ref", 12)):
        tiny_model(seed=seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


def settings(root, models, **method):
    s = fast(root, max_steps=5, save_steps=1, learning_rate=3e-3)  # checkpoints 1-4
    s["model"] = {"name_or_path": str(models / "policy"), "ref_name_or_path": str(models / "ref")}
    s["method"] = {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6, **method}
    return s


def weights(checkpoint, index):
    """The policy (0) or the reference (1) of a checkpoint folder (accelerate numbers the models in the order they
    were prepared: the reference, at load, comes first)."""
    return load_file(checkpoint / ("model_1.safetensors" if index == 0 else "model.safetensors"))


def test_the_reference_is_mixed_with_the_policy_every_k_steps(tmp_path, models):
    alignkit.run("dpo", settings(tmp_path, models))
    ckpt = tmp_path / "out" / "checkpoints"
    ref0 = load_file(models / "ref" / "model.safetensors")
    for step, synced in ((1, False), (2, True), (3, False), (4, True)):
        policy, ref = weights(ckpt / f"checkpoint-{step}", 0), weights(ckpt / f"checkpoint-{step}", 1)
        if synced:
            ref0 = {k: v * 0.4 + 0.6 * policy[k] for k, v in ref0.items()}
        assert ref.keys() == ref0.keys()
        for k in ref0:
            torch.testing.assert_close(ref[k], ref0[k], rtol=1e-6, atol=1e-7, msg=f"step {step}: {k}")
    unsynced = tmp_path / "plain"
    alignkit.run("dpo", settings(unsynced, models, sync_ref_model=False))
    assert all(torch.equal(v, load_file(models / "ref" / "model.safetensors")[k])
               for k, v in weights(unsynced / "out" / "checkpoints" / "checkpoint-4", 1).items())


def test_a_killed_run_resumes_bit_identical(tmp_path, models):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    alignkit.run("dpo", settings(whole, models))
    shutil.copytree(whole, cut)
    for step in (4, 3):  # killed after checkpoint-2 (a sync step; the next sync comes after the resume)
        shutil.rmtree(cut / "out" / "checkpoints" / f"checkpoint-{step}")
    (cut / "out" / "model.safetensors").unlink()
    alignkit.run("dpo", {**settings(cut, models), "train": {**settings(cut, models)["train"],
                                                            "resume_from_checkpoint": "auto"}})
    for index in (0, 1):
        a = weights(whole / "out" / "checkpoints" / "checkpoint-4", index)
        b = weights(cut / "out" / "checkpoints" / "checkpoint-4", index)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(d / "out" / "model.safetensors") for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_jsonl(d / "out" / "metrics.jsonl") if "loss" in r][-2:] for d in (whole, cut)]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("ref", [[], ["model.ref_name_or_path=builtin:tiny"]])
def test_a_lora_policy_is_refused(tmp_path, ref):
    """As TRL: the adapters are not the reference's parameters (and without a reference model there is none)."""
    out = tmp_path / "out"
    line = refused("run", "--method", "dpo", f"train.output_dir={out}", "method.sync_ref_model=true",
                   "model.peft.r=4", *ref, written=out)
    assert "method.sync_ref_model" in line and "remove model.peft" in line


def test_the_engine_refuses_a_synced_reference_for_adapters(models):
    """The core's own check, for any method declaring Loss.reference_sync (here the dpo loss without its validate)."""
    import alignkit_dpo
    from peft import LoraConfig, get_peft_model

    from alignkit.engine.reference import Reference

    config, _ = alignkit.load_config("dpo", {"method": {"sync_ref_model": True}})
    policy = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(alignkit.ConfigError, match="model.peft: this method mixes the policy's weights"):
        Reference(alignkit_dpo.DPOLoss(config.method), policy, config, tiny_tokenizer(), None)


@pytest.mark.slow  # two torchrun processes and one run: about 40 s on 2 CPU cores
def test_two_processes_sync_the_reference_as_one(tmp_path, models):
    """Each process mixes its own replica of the reference: the checkpointed reference is the mix of step 2, and the
    losses after it equal one process's with the same global batch (a rank that skipped the sync would move its
    half of the mean)."""
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    args = ["-q", "run", "--method", "dpo", f"model.name_or_path={models / 'policy'}",
            f"model.ref_name_or_path={models / 'ref'}", "method.sync_ref_model=true", "method.ref_model_sync_steps=2",
            "train.max_steps=4", "train.save_steps=2", "train.logging_steps=1", "train.learning_rate=3e-3",
            "data.max_train_samples=32", "data.max_eval_samples=8", "train.eval_steps=null",
            "train.disable_tqdm=true", "train.plots=false"]
    env = {"ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-dpo", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent), "PYTHONPATH": ":".join(sys.path)}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    for name, launcher, batch in (("two", torchrun, 2), ("one", [sys.executable], 4)):
        proc = subprocess.run([*launcher, "-m", "alignkit", *args,
                               f"train.output_dir={tmp_path / name}", f"train.per_device_train_batch_size={batch}"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("one", "two"))
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (one, two)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    ref0 = load_file(models / "ref" / "model.safetensors")
    policy, ref = (weights(tmp_path / "two" / "checkpoints" / "checkpoint-2", i) for i in (0, 1))
    for k in ref0:  # rank 0 saved: the sync of step 2 on it; the losses after it show rank 1's
        torch.testing.assert_close(ref[k], ref0[k] * 0.4 + 0.6 * policy[k], rtol=1e-6, atol=1e-7)
