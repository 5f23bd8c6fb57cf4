"""The engine on the built-in tiny model: learning, determinism, resume, accumulation, hooks, outputs."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import alignkit
from alignkit import hookimpl, load_config
from alignkit.engine.loop import Engine
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl


def weights(out_dir):
    return load_file(str(out_dir / "model.safetensors"))


def test_loss_is_finite_and_decreases(pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=12, learning_rate=3e-3), plugins=pm)
    rows = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert result.global_step == 12 and result.metrics["eval_loss"] < rows[0]["loss"]


def test_same_seed_same_result(pm, tmp_path):
    a = alignkit.run("orpo", fast(tmp_path / "a"), plugins=pm)
    b = alignkit.run("orpo", fast(tmp_path / "b"), plugins=pm)
    assert read_jsonl(a.output_dir / "metrics.jsonl") == read_jsonl(b.output_dir / "metrics.jsonl")
    wa, wb = weights(a.output_dir), weights(b.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = alignkit.run("orpo", fast(tmp_path / "c", seed=7), plugins=pm)
    assert not torch.equal(weights(c.output_dir)["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])


class Interrupt(Exception):
    pass


class StopAfterSave:
    @hookimpl
    def on_save(self, run, step, path):
        raise Interrupt(step)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resumed_run_equals_uninterrupted(tmp_path, accumulation):
    import alignkit_orpo

    # Steps 3 and 6 fall inside logging windows of 4 and in the second epoch of 32 examples / 8 per step.
    cfg = fast(tmp_path / "full", max_steps=9, save_steps=3, logging_steps=4, eval_steps=4, learning_rate=3e-3,
               per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
    cfg["data"]["max_train_samples"] = 40  # 5 steps per epoch: a partial last window
    full = alignkit.run("orpo", cfg, plugins=plugin_manager(alignkit_orpo))

    cfg["train"]["output_dir"] = str(tmp_path / "resumed")
    with pytest.raises(Interrupt):
        alignkit.run("orpo", cfg, plugins=plugin_manager(alignkit_orpo, StopAfterSave()))
    resumed = alignkit.run("orpo", cfg, plugins=plugin_manager(alignkit_orpo),
                           **{"train.resume_from_checkpoint": "auto"})
    assert resumed.global_step == full.global_step == 9
    assert read_jsonl(resumed.output_dir / "metrics.jsonl") == read_jsonl(full.output_dir / "metrics.jsonl")
    wf, wr = weights(full.output_dir), weights(resumed.output_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_gradient_does_not_depend_on_the_accumulation_split(pm, tmp_path):
    cfg, method = load_config("orpo", fast(tmp_path), plugins=pm)
    engine = Engine(cfg, method, pm).load()
    data = engine.data.formatted(need_train=True)["train"]
    feats = [data[i] for i in range(4)]
    grads = []
    for split in ([feats], [[f] for f in feats], [feats[:1], feats[1:]]):
        engine.model.zero_grad()
        loss, _ = engine.accumulate_gradients(engine.model, [engine.formatter.collate(f) for f in split])
        grads.append((loss.item(), [p.grad.clone() for p in engine.model.parameters()]))
    (loss_1x4, g_1x4), *others = grads
    for loss, g in others:
        assert loss == pytest.approx(loss_1x4, rel=1e-5)
        for a, b in zip(g_1x4, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_logged_loss_does_not_depend_on_the_split(pm, tmp_path):
    one = alignkit.run("orpo", fast(tmp_path / "1x4", max_steps=2, max_grad_norm=0.0), plugins=pm)
    four = alignkit.run("orpo", fast(tmp_path / "4x1", max_steps=2, per_device_train_batch_size=1,
                                      gradient_accumulation_steps=4, max_grad_norm=0.0), plugins=pm)
    rows_1, rows_4 = read_jsonl(one.output_dir / "metrics.jsonl"), read_jsonl(four.output_dir / "metrics.jsonl")
    assert rows_1[0]["loss"] == pytest.approx(rows_4[0]["loss"], rel=1e-5)
    assert rows_1[1]["loss"] == pytest.approx(rows_4[1]["loss"], rel=1e-4)


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def on_train_start(self, run):
        self.calls.append(("start", run.step, run.max_steps))

    @hookimpl
    def on_step_end(self, run, step, metrics):
        self.calls.append(("step", step, sorted(metrics)))

    @hookimpl
    def on_log(self, run, step, logs):
        self.calls.append(("log", step, sorted(logs)))

    @hookimpl
    def on_evaluate(self, run, step, metrics):
        self.calls.append(("eval", step, sorted(metrics)))

    @hookimpl
    def on_save(self, run, step, path):
        self.calls.append(("save", step, (path / "alignkit_state.json").is_file()))

    @hookimpl
    def on_train_end(self, run, metrics):
        self.calls.append(("end", run.step, "eval_loss" in metrics))


def test_lifecycle_hooks(tmp_path):
    import alignkit_orpo

    rec = Recorder()
    alignkit.run("orpo", fast(tmp_path, max_steps=4, logging_steps=2, eval_steps=2, save_steps=3),
                 plugins=plugin_manager(alignkit_orpo, rec))
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["start", "step", "step", "log", "eval", "step", "save", "step", "log", "eval", "end"]
    assert rec.calls[0] == ("start", 0, 4)
    assert "rewards/accuracies" in rec.calls[1][2] and "loss" in rec.calls[1][2]
    assert {"loss", "learning_rate", "grad_norm", "nll_loss", "log_odds_ratio"} <= set(rec.calls[3][2])
    assert "eval_rewards/margins" in rec.calls[4][2]
    assert rec.calls[6] == ("save", 3, True)
    assert rec.calls[-1] == ("end", 4, True)


def test_outputs_and_checkpoint_rotation(pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=5, save_steps=1, save_total_limit=2), plugins=pm)
    out = result.output_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    again, _ = load_config(None, out / "config.yaml", plugins=pm)
    assert again == result.config
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    trained = weights(out)
    assert torch.equal(model.state_dict()["model.norm.weight"], trained["model.norm.weight"])


def test_resume_from_a_checkpoint_of_another_length_is_refused(pm, tmp_path):
    alignkit.run("orpo", fast(tmp_path, max_steps=4, save_steps=2), plugins=pm)
    with pytest.raises(alignkit.ConfigError, match=r"cannot change mid-run: train.max_steps \(4 -> 6\)"):
        alignkit.run("orpo", fast(tmp_path, max_steps=6, save_steps=2, resume_from_checkpoint="auto"), plugins=pm)
    with pytest.raises(alignkit.ConfigError, match="nowhere cannot be resumed: no such folder"):
        alignkit.run("orpo", fast(tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere")), plugins=pm)


def test_disable_dropout(pm, tmp_path):
    from alignkit.testing import tiny_model

    model = tiny_model(attention_dropout=0.1)
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.5))
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm, model=model)
    assert model.model.layers[0].mlp.drop.p == 0.0
    kept = tiny_model()
    kept.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.5))
    alignkit.run("orpo", fast(tmp_path / "k", max_steps=1), plugins=pm, model=kept, **{"method.disable_dropout": False})
    assert kept.model.layers[0].mlp.drop.p == 0.5


def test_uninstalled_tracker_is_an_error_not_silence(pm, tmp_path):
    from accelerate.tracking import get_available_trackers

    missing = next(t for t in ("swanlab", "aim", "clearml", "dvclive") if t not in
                   {str(getattr(x, "value", x)) for x in get_available_trackers()})
    with pytest.raises(alignkit.ConfigError,
                       match=f"train.report_to: {missing} is not installed here; pip install {missing}"):
        alignkit.run("orpo", fast(tmp_path, report_to=[missing]), plugins=pm)


@pytest.mark.parametrize("options", [{"bf16": True}, {"gradient_checkpointing": True},
                                     {"gradient_checkpointing": True, "bf16": True}])
def test_precision_and_memory_options_train(pm, tmp_path, options):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=3, learning_rate=3e-3, **options), plugins=pm)
    rows = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_gradient_checkpointing_gives_the_same_gradients(pm, tmp_path):
    grads = []
    for checkpointing in (False, True):
        cfg, method = load_config("orpo", fast(tmp_path), plugins=pm)
        engine = Engine(cfg, method, pm).load()
        if checkpointing:
            engine.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine.model.train()
        data = engine.data.formatted(need_train=True)["train"]
        engine.accumulate_gradients(engine.model, [engine.formatter.collate([data[i] for i in range(4)])])
        grads.append([p.grad for p in engine.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_logged_metrics_are_the_mean_over_every_micro_batch_of_the_window(tmp_path):
    import alignkit_orpo

    rec = Recorder()
    alignkit.run("orpo", fast(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2), plugins=plugin_manager(alignkit_orpo, rec))
    steps = [c for c in rec.calls if c[0] == "step"]
    assert len(steps) == 4

    class Values:
        step, log = [], []

        @hookimpl
        def on_step_end(self, run, step, metrics):
            Values.step.append(metrics)

        @hookimpl
        def on_log(self, run, step, logs):
            Values.log.append(logs)

    alignkit.run("orpo", fast(tmp_path / "v", max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2), plugins=plugin_manager(alignkit_orpo, Values()))
    for window, logged in zip((Values.step[:2], Values.step[2:]), Values.log):
        for key in ("nll_loss", "rewards/accuracies", "logits/chosen"):
            assert logged[key] == pytest.approx(sum(m[key] for m in window) / 2, rel=1e-6)
        assert logged["loss"] == pytest.approx(sum(m["loss"] for m in window) / 2, rel=1e-6)


def test_data_report_is_logged_once(pm, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm,
                 **{"method.max_length": 10, "method.max_prompt_length": 6})
    reports = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(reports) == 2 and reports[0].startswith("train data: 32 examples kept, ")
    assert reports[1].startswith("eval data: 8 examples kept, ")


def test_tables_go_to_trackers_that_take_them(pm, tmp_path):
    cfg, method = load_config("orpo", fast(tmp_path), plugins=pm)
    engine = Engine(cfg, method, pm).load()

    class TableTracker:
        tables = []

        def log_table(self, name, columns, data, step):
            self.tables.append((name, columns, data, step))

    engine.accelerator.trackers = [TableTracker(), object()]
    engine.state.log_table("completions", ["step", "prompt"], [[0, "p"]])
    assert TableTracker.tables == [("completions", ["step", "prompt"], [[0, "p"]], 0)]
