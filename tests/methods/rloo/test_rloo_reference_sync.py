"""RLOO's reference sync (method.sync_ref_model, TRL's RLOOConfig.sync_ref_model): every ref_model_sync_steps
optimizer steps the reference becomes alpha * policy + (1 - alpha) * reference, through the core's
Loss.reference_sync, so the KL in later rollouts is to the moved reference; refused with beta 0 (no reference) and
with LoRA, and reachable through the TRL facade under TRL's field names."""

import alignkit_rloo
import pytest
import torch
from safetensors.torch import load_file

import alignkit
from alignkit.testing import plugin_manager, tiny_model, tiny_tokenizer
from helpers import fast, read_jsonl, refused


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    tiny_model(seed=3).save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return root


def settings(root, policy, **method):
    s = fast(root, max_steps=5, save_steps=1, learning_rate=1e-2)
    s["model"] = {"name_or_path": str(policy)}
    s["data"] = {"max_train_samples": 16, "max_eval_samples": 4}
    s["method"] = {"num_generations": 4, "max_completion_length": 6, "beta": 0.5, "sync_ref_model": True,
                   "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6, **method}
    return s


def test_the_reference_moves_toward_the_policy_every_k_steps(tmp_path, policy):
    pm = plugin_manager(alignkit_rloo)
    alignkit.run("rloo", settings(tmp_path / "synced", policy), plugins=pm)
    ckpt = tmp_path / "synced" / "out" / "checkpoints"
    ref = load_file(policy / "model.safetensors")  # the implicit reference: a copy of the initial policy
    for step in (1, 2, 3, 4):
        saved_policy, saved_ref = (load_file(ckpt / f"checkpoint-{step}" / name)
                                   for name in ("model_1.safetensors", "model.safetensors"))
        if step % 2 == 0:
            ref = {k: v * 0.4 + 0.6 * saved_policy[k] for k, v in ref.items()}
        for k in ref:
            torch.testing.assert_close(saved_ref[k], ref[k], rtol=1e-6, atol=1e-7, msg=f"step {step}: {k}")
    alignkit.run("rloo", settings(tmp_path / "frozen", policy, sync_ref_model=False), plugins=pm)
    kl = {name: [r["kl"] for r in read_jsonl(tmp_path / name / "out" / "metrics.jsonl") if "kl" in r]
          for name in ("synced", "frozen")}
    assert kl["synced"][:2] == kl["frozen"][:2]  # the same rollouts until the first sync, after step 2
    assert kl["synced"][2] != kl["frozen"][2]  # step 3's rollout is scored against the moved reference


@pytest.mark.parametrize(("extra", "needle"), [
    (["method.beta=0"], "method.sync_ref_model with method.beta=0"),
    (["method.beta=0.05", "model.peft.r=4"], "model.peft"),
])
def test_refused_in_one_line_before_anything_is_written(tmp_path, extra, needle):
    out = tmp_path / "out"
    line = refused("run", "--method", "rloo", f"train.output_dir={out}", "method.sync_ref_model=true", *extra,
                   written=out)
    assert needle in line


def test_the_trl_facade_maps_trls_field_names():
    from alignkit_rloo.trl import RLOOConfig

    args = RLOOConfig(output_dir="x", sync_ref_model=True, ref_model_mixup_alpha=0.9, ref_model_sync_steps=64,
                      use_cpu=True, report_to="none")
    out = args.to_alignkit()
    assert (out["method.sync_ref_model"], out["method.ref_model_mixup_alpha"], out["method.ref_model_sync_steps"]) \
        == (True, 0.9, 64)
