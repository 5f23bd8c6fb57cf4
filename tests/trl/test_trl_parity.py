"""The same numbers: each TRL-style trainer (alignkit_trl) trains exactly as `alignkit run` with the equivalent
config written out by hand (TRL 1.16's defaults where they differ from alignkit's), on the built-in model and data."""

import math

import pytest
from alignkit_trl import DatasetMixtureConfig, get_dataset

import alignkit
from helpers import read_jsonl

#: the per-step numbers both runs log
COMPARED = ("loss", "grad_norm", "learning_rate")


def builtin(name: str):
    return get_dataset(DatasetMixtureConfig(datasets=[{"path": f"builtin:{name}"}]))["train"]


def common_args(tmp_path) -> dict:
    return {"output_dir": str(tmp_path / "facade"), "max_steps": 3, "per_device_train_batch_size": 4,
            "logging_steps": 1, "report_to": "none", "bf16": False, "disable_tqdm": True, "seed": 7,
            "save_strategy": "no"}


def alignkit_run(tmp_path, method: str, data: str, **overrides) -> list[dict]:
    """`alignkit run` with TRL 1.16's training defaults spelled out (gradient checkpointing on, no warmup: the
    built-in data's demo settings do not apply to a trainer given a dataset)."""
    out = tmp_path / "run"
    config = {"data": {"train": f"builtin:{data}"},
              "train": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1,
                        "seed": 7, "gradient_checkpointing": True, "warmup_ratio": 0.0, "disable_tqdm": True,
                        "plots": False, "save_steps": None, "eval_steps": None, "eval_on_start": False,
                        "report_to": []}}
    alignkit.run(method, config, **overrides)
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def facade_rows(trainer) -> list[dict]:
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


def assert_same(facade: list[dict], run: list[dict], keys=COMPARED):
    assert [r["step"] for r in facade] == [r["step"] for r in run] == [1, 2, 3]
    for a, b in zip(facade, run):
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-6), (a["step"], key, a[key], b[key])


def test_sft_trainer_trains_as_alignkit_run(tmp_path):
    from alignkit_trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer("builtin:tiny", args=SFTConfig(**common_args(tmp_path)), train_dataset=builtin("sort-sft"))
    facade = facade_rows(trainer)
    run = alignkit_run(tmp_path, "sft", "sort-sft", **{"train.learning_rate": 2e-5})
    assert_same(facade, run, COMPARED + ("mean_token_accuracy", "num_tokens"))


def test_dpo_trainer_trains_as_alignkit_run(tmp_path):
    from alignkit_trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer("builtin:tiny", args=DPOConfig(**common_args(tmp_path), learning_rate=1e-3),
                         train_dataset=builtin("sort"))
    facade = facade_rows(trainer)
    run = alignkit_run(tmp_path, "dpo", "sort", **{"train.learning_rate": 1e-3})
    assert_same(facade, run, COMPARED + ("rewards/margins", "rewards/accuracies"))
    assert facade[-1]["rewards/margins"] != 0  # the policy moved away from the reference


def test_kto_trainer_trains_as_alignkit_run_in_dataset_order(tmp_path):
    from alignkit_trl import KTOConfig, KTOTrainer

    trainer = KTOTrainer("builtin:tiny", args=KTOConfig(**common_args(tmp_path), learning_rate=1e-3),
                         train_dataset=builtin("sort-kto"))
    facade = facade_rows(trainer)
    # TRL's KTOConfig samples sequentially (train_sampling_strategy="sequential"): no shuffle
    run = alignkit_run(tmp_path, "kto", "sort-kto", **{"train.learning_rate": 1e-3, "train.shuffle": False})
    assert_same(facade, run, COMPARED + ("kl",))


def test_kto_sequential_differs_from_shuffled(tmp_path):
    """train.shuffle=false changes the batches (so the KTO parity above checks the order, not just the maths)."""
    shuffled = alignkit_run(tmp_path / "a", "kto", "sort-kto", **{"train.learning_rate": 1e-3})
    in_order = alignkit_run(tmp_path / "b", "kto", "sort-kto", **{"train.learning_rate": 1e-3, "train.shuffle": False})
    assert shuffled[-1]["loss"] != in_order[-1]["loss"]  # (at step 1 the policy is the reference: loss 0.5 both)


GRPO_ARGS = {"num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-4}


@pytest.mark.parametrize("as_callable", [False, True], ids=["registry-names", "callables"])
def test_grpo_trainer_trains_as_alignkit_run(tmp_path, as_callable):
    from alignkit_grpo.rewards import sort_order
    from alignkit_trl import GRPOConfig, GRPOTrainer

    from alignkit.online import exact_match

    funcs = [sort_order, exact_match] if as_callable else ["sort-order", "exact-match"]
    trainer = GRPOTrainer("builtin:tiny", reward_funcs=funcs, args=GRPOConfig(**common_args(tmp_path), **GRPO_ARGS),
                          train_dataset=builtin("sort-prompts"))
    facade = facade_rows(trainer)
    run = alignkit_run(tmp_path, "grpo", "sort-prompts", **{
        "method.reward_funcs": ["sort-order", "exact-match"], "method.num_generations": 4,
        "method.max_completion_length": 8, "method.sft_warmup_steps": 0, "train.learning_rate": 1e-4,
        "train.per_device_train_batch_size": 1})  # TRL's batch of 4 counts completions: one prompt x 4
    assert_same(facade, run, COMPARED + ("reward", "reward_std"))
    names = ("sort_order", "exact_match") if as_callable else ("sort-order", "exact-match")
    for mine, theirs in zip(names, ("sort-order", "exact-match")):  # TRL logs rewards/<function name>/mean
        assert [r[f"rewards/{mine}/mean"] for r in facade] == [r[f"rewards/{theirs}/mean"] for r in run]


def test_rloo_trainer_trains_as_alignkit_run(tmp_path):
    from alignkit_trl import RLOOConfig, RLOOTrainer

    trainer = RLOOTrainer("builtin:tiny", reward_funcs=["sort-order"], train_dataset=builtin("sort-prompts"),
                          args=RLOOConfig(**common_args(tmp_path), **GRPO_ARGS))
    facade = facade_rows(trainer)
    run = alignkit_run(tmp_path, "rloo", "sort-prompts", **{  # TRL's RLOO: beta 0.05, max_completion_length 512
        "method.reward_funcs": ["sort-order"], "method.num_generations": 4, "method.max_completion_length": 8,
        "method.beta": 0.05, "method.sft_warmup_steps": 0, "train.learning_rate": 1e-4,
        "train.per_device_train_batch_size": 1})  # TRL's batch of 4 counts completions: one prompt x 4
    assert_same(facade, run, COMPARED + ("reward",))


def test_reward_trainer_trains_as_alignkit_run(tmp_path):
    from alignkit_trl import RewardConfig, RewardTrainer

    trainer = RewardTrainer("builtin:tiny", args=RewardConfig(**common_args(tmp_path)),
                            train_dataset=builtin("sort-reward"))
    facade = facade_rows(trainer)
    run = alignkit_run(tmp_path, "reward", "sort-reward", **{"train.learning_rate": 1e-4})  # TRL's RewardConfig
    assert_same(facade, run, COMPARED + ("accuracy",))


def test_grpo_reward_functions_see_conversations_on_conversational_data(tmp_path):
    """TRL passes each completion of conversational data as [{"role": "assistant", "content": ...}]."""
    from alignkit_trl import GRPOConfig, GRPOTrainer

    seen = []

    def assistant_length(completions, **kwargs):
        seen.extend(completions)
        return [float(len(c[0]["content"])) for c in completions]

    rows = builtin("sort-prompts").select(range(16)).map(
        lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})
    trainer = GRPOTrainer("builtin:tiny", reward_funcs=[assistant_length], train_dataset=rows,
                          args=GRPOConfig(**common_args(tmp_path), **GRPO_ARGS))
    trainer.args.max_steps = trainer.engine.config.train.max_steps = 1
    facade = facade_rows(trainer)
    assert seen and all(c[0]["role"] == "assistant" for c in seen)
    assert facade[0]["rewards/assistant_length/mean"] > 0  # the lengths of what the tiny model sampled
