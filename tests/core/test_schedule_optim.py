"""The engine's general capabilities: a Schedule an API user passes, train.optim through transformers'
optimizer factory, optimizer/lr_scheduler factories, and train.checkpoint_dir."""

import pytest
import torch

import alignkit
from alignkit import ConfigError
from alignkit.config import TrainConfig
from alignkit.engine.optim import build_optimizer
from alignkit.engine.schedule import Actions, Schedule
from helpers import fast, read_jsonl


class EvalEveryStepStopAtTwo(Schedule):
    """Evaluate after every step, checkpoint at step 1, stop after step 2, no final model."""

    def at_start(self, run):
        return Actions()

    def after_step(self, run):
        return Actions(log=True, evaluate=True, checkpoint=run.step == 1, stop=run.step == 2)

    def at_end(self, run):
        return Actions()


def test_a_schedule_decides_logging_evaluation_checkpoints_and_stopping(pm, tmp_path):
    cfg = fast(tmp_path, max_steps=4, eval_steps=3, save_steps=3)  # the schedule, not these keys, decides
    result = alignkit.run("orpo", cfg, plugins=pm, schedule=EvalEveryStepStopAtTwo(None))
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert result.global_step == 2
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert not (result.output_dir / "model.safetensors").exists()  # at_end asked for no model


def test_default_schedule_keeps_alignkits_conventions(pm, tmp_path):
    result = alignkit.run("orpo", fast(tmp_path, max_steps=3, logging_steps=2, eval_steps=2), plugins=pm)
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    # a row at the last step, an evaluation at the end (step 3 is not a multiple of eval_steps), the model saved
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(2, False), (2, True), (3, False), (3, True)]
    assert (result.output_dir / "model.safetensors").is_file()


def test_optim_names_map_through_transformers_factory():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    rms = build_optimizer(model, TrainConfig(optim="rmsprop", optim_args="alpha=0.8,centered=true", weight_decay=0.1,
                                             learning_rate=0.01))
    assert type(rms) is torch.optim.RMSprop
    assert rms.defaults["alpha"] == 0.8 and rms.defaults["centered"] is True and rms.defaults["lr"] == 0.01
    decays = {p.ndim: g["weight_decay"] for g in rms.param_groups for p in g["params"]}
    assert decays == {2: 0.1, 1: 0.0}  # biases and norm weights get no weight decay
    assert type(build_optimizer(model, TrainConfig(optim="sgd"))) is torch.optim.SGD
    with pytest.raises(ConfigError, match="train.optim=adamw_bnb_8bit cannot run here: .*bitsandbytes"):
        build_optimizer(model, TrainConfig(optim="adamw_bnb_8bit"))
    with pytest.raises(ValueError, match="unknown optimizer 'rmsporp' \\(did you mean 'rmsprop'\\?\\)"):
        TrainConfig(optim="rmsporp")


def test_optimizer_and_scheduler_factories_and_checkpoint_dir(pm, tmp_path):
    made = {}

    def optimizer(model):
        made["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.0)
        return made["optimizer"]

    def lr_scheduler(opt, num_training_steps):
        made["steps"] = num_training_steps
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    cfg = fast(tmp_path, max_steps=2, save_steps=1, checkpoint_dir=".")
    result = alignkit.run("orpo", cfg, plugins=pm, optimizer=optimizer, lr_scheduler=lr_scheduler)
    assert made["steps"] == 2 and isinstance(made["optimizer"], torch.optim.SGD)
    assert [r["learning_rate"] for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r] == [0.0, 0.0]
    assert sorted(p.name for p in result.output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    resumed = alignkit.run("orpo", {**cfg, "train": {**cfg["train"], "resume_from_checkpoint": "auto"}}, plugins=pm,
                           optimizer=optimizer, lr_scheduler=lr_scheduler)
    assert resumed.global_step == 2
