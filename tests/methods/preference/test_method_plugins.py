"""The DPO, CPO and SimPO plugins in plugins/: their maths in float64, the reference model, selection by name."""

import json
import subprocess
import sys

import alignkit_cpo
import alignkit_dpo
import alignkit_simpo
import pytest
import torch
from click.testing import CliRunner

import alignkit
import alignkit_orpo
from alignkit.cli.commands import cli
from alignkit.engine.loop import Engine
from alignkit.testing import plugin_manager, tiny_model
from helpers import FixedLogits, fast, read_jsonl, two_pairs


@pytest.fixture
def pm():
    return plugin_manager(alignkit_orpo, alignkit_dpo, alignkit_cpo, alignkit_simpo)


def answer_logps(logits, labels):
    """Per row: the list of float64 log-probs of the answer tokens (label at t predicted at t-1)."""
    logp = torch.log_softmax(logits.double(), -1)
    return [[logp[i, t - 1, labels[i, t]] for t in range(1, labels.shape[1]) if labels[i, t] != -100]
            for i in range(labels.shape[0])]


def logsig(x):
    return torch.nn.functional.logsigmoid(torch.as_tensor(x, dtype=torch.float64))


def check(out, counts, expected):
    got = {"loss": out.normalized(counts), **out.metrics}
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-8), key


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cpo_sigmoid(pm, smoothing):
    torch.manual_seed(0)
    b, logits = two_pairs(), torch.randn(4, 5, 11)
    loss = alignkit.get_method("cpo", pm).loss(alignkit_cpo.CPOConfig(beta=0.3, cpo_alpha=0.7,
                                                                      label_smoothing=smoothing))
    rows = answer_logps(logits, b["labels"])
    c, r = [sum(x) for x in rows[:2]], [sum(x) for x in rows[2:]]
    pref = [-(logsig(0.3 * (ci - ri)) * (1 - smoothing) + logsig(-0.3 * (ci - ri)) * smoothing) for ci, ri in zip(c, r)]
    chosen_tokens = rows[0] + rows[1]
    nll = -sum(chosen_tokens) / len(chosen_tokens)
    check(loss(FixedLogits(logits), b), loss.counts(b), {
        "loss": sum(pref) / 2 + 0.7 * nll, "nll_loss": nll, "rewards/chosen": 0.3 * sum(c) / 2,
        "rewards/margins": 0.3 * (sum(c) - sum(r)) / 2, "logps/rejected": sum(r) / 2,
        "rewards/accuracies": sum(ci > ri for ci, ri in zip(c, r)) / 2, "logits/chosen": logits[:2].double().mean()})


def test_simpo(pm):
    torch.manual_seed(1)
    b, logits = two_pairs(), torch.randn(4, 5, 11) * 2
    config = alignkit.get_method("simpo", pm).config()
    assert (config.beta, config.simpo_gamma, config.cpo_alpha, config.max_length) == (2.0, 0.5, 0.0, 1024)
    loss = alignkit_simpo.SimPOLoss(config)
    rows = answer_logps(logits, b["labels"])
    means = [sum(x) / len(x) for x in rows]
    c, r = means[:2], means[2:]
    pref = [-logsig(2.0 * ((ci - ri) - 0.5 / 2.0)) for ci, ri in zip(c, r)]
    out = loss(FixedLogits(logits), b)
    assert "chosen_tokens" not in out.terms  # no NLL by default
    check(out, loss.counts(b), {"loss": sum(pref) / 2, "rewards/chosen": 2.0 * sum(c) / 2,
                                "rewards/rejected": 2.0 * sum(r) / 2, "nll_loss": 0.0})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_sigmoid_against_reference(pm, smoothing):
    torch.manual_seed(2)
    b, policy, reference = two_pairs(), torch.randn(4, 5, 11), torch.randn(4, 5, 11)
    loss = alignkit_dpo.DPOLoss(alignkit_dpo.DPOConfig(beta=0.5, label_smoothing=smoothing,
                                                       loss_type="robust" if smoothing else "sigmoid"))
    pol, ref = answer_logps(policy, b["labels"]), answer_logps(reference, b["labels"])
    pc, pr = [sum(x) for x in pol[:2]], [sum(x) for x in pol[2:]]
    rc, rr = [sum(x) for x in ref[:2]], [sum(x) for x in ref[2:]]
    h = [(pc[i] - pr[i]) - (rc[i] - rr[i]) for i in range(2)]
    losses = [(-(1 - smoothing) * logsig(0.5 * x) + smoothing * logsig(-0.5 * x)) / (1 - 2 * smoothing) for x in h]
    cr, rj = [0.5 * (pc[i] - rc[i]) for i in range(2)], [0.5 * (pr[i] - rr[i]) for i in range(2)]
    ref_out = loss.reference(FixedLogits(reference), b)
    check(loss(FixedLogits(policy), b, ref=ref_out), loss.counts(b), {
        "loss": sum(losses) / 2, "rewards/chosen": sum(cr) / 2, "rewards/rejected": sum(rj) / 2,
        "rewards/margins": (sum(cr) - sum(rj)) / 2, "rewards/accuracies": sum(a > b for a, b in zip(cr, rj)) / 2})


def test_formatter_is_reused_by_name_with_its_config_fields(pm):
    method = alignkit.get_method("cpo", pm)  # dpo has its own formatter: TRL 1.16's DPO tokenization
    assert method.formatter is alignkit_orpo.PreferenceFormatter
    assert {"max_length", "truncation_mode", "beta", "max_prompt_length"} <= set(method.config.model_fields)
    cfg, _ = alignkit.load_config("cpo", {"method": {"max_length": 64, "max_prompt_length": 32}}, plugins=pm)
    assert cfg.method.max_length == 64 and cfg.method.name == "cpo"

    class Wrong:
        @alignkit.hookimpl
        def register_methods(self, register):
            register(alignkit.Method(name="x", config=alignkit.MethodConfig, formatter="preferences",
                                     loss="orpo", description="x"))

    with pytest.raises(alignkit.PluginError, match="uses formatter 'preferences' \\(did you mean 'preference'\\?\\)"):
        alignkit.get_method("x", plugin_manager(alignkit_orpo, Wrong()))


@pytest.mark.parametrize("method", ["cpo", "simpo", "dpo"])
def test_each_plugin_trains_through_the_api(pm, tmp_path, method):
    result = alignkit.run(method, fast(tmp_path, max_steps=6, learning_rate=3e-3, eval_on_start=True), plugins=pm)
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "eval_rewards/margins" in evals[-1] and "arXiv" in (result.output_dir / "README.md").read_text()


def test_dpo_reference_is_the_frozen_initial_policy(pm, tmp_path):
    model = tiny_model(seed=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg, method = alignkit.load_config("dpo", fast(tmp_path, max_steps=3, learning_rate=3e-3), plugins=pm)
    engine = Engine(cfg, method, pm, model=model)
    engine.train()
    ref = engine.accelerator.unwrap_model(engine.reference.model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in initial.items())
    assert not torch.equal(model.state_dict()["model.norm.weight"], initial["model.norm.weight"])


def test_dpo_reference_from_another_model(pm, tmp_path):
    tiny_model(seed=9).save_pretrained(tmp_path / "ref")
    cfg, method = alignkit.load_config("dpo", fast(tmp_path, max_steps=1),
                                       {"model.ref_name_or_path": str(tmp_path / "ref")},
                                       plugins=pm)
    engine = Engine(cfg, method, pm, model=tiny_model(seed=3)).load()
    key = "model.embed_tokens.weight"
    assert torch.equal(engine.reference.model.state_dict()[key], tiny_model(seed=9).state_dict()[key])
    assert not torch.equal(engine.model.state_dict()[key], tiny_model(seed=9).state_dict()[key])


def test_precomputed_reference_gives_the_same_run(pm, tmp_path):
    live = alignkit.run("dpo", fast(tmp_path / "live", max_steps=3, learning_rate=3e-3), plugins=pm)
    pre = alignkit.run("dpo", fast(tmp_path / "pre", max_steps=3, learning_rate=3e-3), plugins=pm,
                       **{"method.precompute_ref_log_probs": True})
    for a, b in zip(read_jsonl(live.output_dir / "metrics.jsonl"), read_jsonl(pre.output_dir / "metrics.jsonl")):
        assert a.keys() == b.keys()
        for k in a:
            margin = a.get(k.replace("accuracies", "margins"), 1.0)
            if k.endswith("rewards/accuracies") and abs(margin) < 1e-5:
                continue  # policy == reference (step 1): chosen > rejected compares two float-rounding residues
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_dpo_with_lora_uses_the_policy_with_adapters_disabled(pm, tmp_path):
    cfg, method = alignkit.load_config("dpo", fast(tmp_path, max_steps=2, learning_rate=1e-2),
                                       {"model.peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}, plugins=pm)
    engine = Engine(cfg, method, pm, model=tiny_model(seed=3)).load()
    assert engine.reference.model is None  # no second copy
    engine.train()
    data = engine.data.formatted(need_train=True)["train"]
    b = engine.formatter.collate([data[i] for i in range(2)])
    ref = engine.reference(engine.model, dict(b))
    base = engine.loss.reference(tiny_model(seed=3), b)
    assert torch.allclose(ref["chosen"], base["chosen"], atol=1e-5)
    with torch.no_grad():
        trained = engine.loss.reference(engine.model, b)
    assert not torch.allclose(trained["chosen"], base["chosen"], atol=1e-5)  # the adapters did learn


def test_selection_by_name_in_cli(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_LOAD_PLUGINS", raising=False)
    listing = CliRunner().invoke(cli, ["methods"]).output
    for name in ("cpo", "dpo", "simpo"):
        line = next(row for row in listing.splitlines() if row.startswith(name))
        assert f"alignkit-{name} 0.1.0" in line
    config = CliRunner().invoke(cli, ["config", "--method", "simpo"])
    assert "  simpo_gamma: 0.5" in config.output and "  max_length: 1024" in config.output
    for name in ("cpo", "dpo", "simpo"):
        run = CliRunner().invoke(cli, ["run", "--method", name, f"train.output_dir={tmp_path / name}",
                                       "train.max_steps=2", "data.max_train_samples=8", "data.max_eval_samples=4",
                                       "train.disable_tqdm=true"])
        assert run.exit_code == 0, run.output
        assert json.loads(run.stdout)["global_step"] == 2


def test_uninstalled_plugin_is_gone(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit,alignkit-dpo,alignkit-cpo")
    proc = subprocess.run([sys.executable, "-m", "alignkit", "methods"], capture_output=True, text=True)
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["cpo", "dpo", "online-dpo", "orpo"]
    proc = subprocess.run([sys.executable, "-m", "alignkit", "run", "--method", "simpo"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown method 'simpo'" in proc.stderr
