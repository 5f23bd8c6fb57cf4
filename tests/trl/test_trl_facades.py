"""alignkit_trl's TRL 1.16 configs and trainers: TRL's field names and defaults, what alignkit cannot honour refused
with the reason (before anything is written), what cannot change the weights ignored with a warning, and nothing
of it imported until a name is used."""

import dataclasses
import os
import subprocess
import sys
import warnings

import alignkit_trl
import pytest
import torch
import trl
from alignkit_trl import DatasetMixtureConfig, get_dataset

CONFIGS = ["SFTConfig", "DPOConfig", "KTOConfig", "GRPOConfig", "RLOOConfig", "RewardConfig"]


def default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_have_trl_116s_fields_and_defaults(name):
    ours = {f.name: default(f) for f in dataclasses.fields(getattr(alignkit_trl, name))}
    theirs = {f.name: default(f) for f in dataclasses.fields(getattr(trl, name))}
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    assert {k: ours[k] for k in theirs} == theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_a_default_config_resolves_as_trls(name, tmp_path):
    """After __post_init__ (bf16 on unless fp16, the derived fields): the same values as TRL's own instance."""
    kwargs = {"output_dir": str(tmp_path), "use_cpu": True}
    ours, theirs = getattr(alignkit_trl, name)(**kwargs), getattr(trl, name)(**kwargs)
    skip = {"generation_batch_size", "steps_per_generation"}  # TRL fills them; alignkit leaves them unset (derived)
    for f in dataclasses.fields(theirs):
        if f.name not in skip:
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def sft_rows():
    return get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort-sft"}]))["train"].select(range(16))


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("neftune_noise_alpha", 5.0, "NEFTune is not supported"),
    ("packing_strategy", "bfd_split", "bfd.*wrapped"),
    ("data_seed", 3, "alignkit shuffles with seed"),
])
def test_a_field_alignkit_cannot_honour_is_refused_before_anything_is_written(tmp_path, field, value, reason):
    from alignkit_trl import SFTConfig, SFTTrainer

    out = tmp_path / "out"
    args = SFTConfig(output_dir=str(out), use_cpu=True, report_to="none", **{field: value})
    with pytest.raises(ValueError, match=f"SFTConfig.{field}=.* is not supported by alignkit .*{reason}"):
        SFTTrainer("builtin:tiny", args=args, train_dataset=sft_rows())
    assert not out.exists()


def test_a_grpo_sampling_field_alignkit_lacks_is_refused():
    from alignkit_trl import GRPOConfig

    with pytest.raises(ValueError, match="GRPOConfig.repetition_penalty=1.1 .*not a sampling option"):
        GRPOConfig(output_dir="x", use_cpu=True, repetition_penalty=1.1).to_alignkit()


def test_a_field_that_cannot_change_the_weights_is_ignored_with_a_warning():
    from alignkit_trl import DPOConfig

    with pytest.warns(UserWarning, match=r"DPOConfig.logging_nan_inf_filter=False is ignored by alignkit \(no effect"):
        DPOConfig(output_dir="x", use_cpu=True, logging_nan_inf_filter=False).to_alignkit()


def test_trl_defaults_reach_alignkit():
    from alignkit_trl import GRPOConfig, KTOConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grpo = GRPOConfig(output_dir="x", use_cpu=True).to_alignkit()
        kto = KTOConfig(output_dir="x", use_cpu=True).to_alignkit()
    assert not [w for w in caught if "alignkit" in str(w.message)]  # a default config: nothing ignored
    assert grpo["method.max_completion_length"] == 512 and grpo["train.learning_rate"] == 1e-6
    assert grpo["train.bf16"] is True and grpo["train.gradient_checkpointing"] is True and grpo["train.shuffle"]
    assert kto["train.shuffle"] is False  # TRL's KTO samples sequentially


def test_unsupported_constructor_arguments_are_refused(tmp_path):
    from alignkit_trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"SFTTrainer\(compute_loss_func=...\) is not supported by alignkit"):
        SFTTrainer("builtin:tiny", args=args, train_dataset=sft_rows(), compute_loss_func=lambda *a, **k: 0)


def test_formatting_func_turns_rows_into_text(tmp_path):
    from alignkit_trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                     per_device_train_batch_size=4, disable_tqdm=True)
    t = SFTTrainer("builtin:tiny", args=args, train_dataset=sft_rows().map(lambda r: {"q": r["prompt"]},
                                                                           remove_columns=["prompt", "completion"]),
                   formatting_func=lambda row: row["q"] + " ok")
    assert t.train().global_step == 1


def test_grpo_reward_funcs_as_trl_takes_them():
    from alignkit.trainer_facade.online import reward_names

    def mine(prompts, completions, **kw):
        return [0.0] * len(completions)

    names, callables = reward_names([mine, "exact-match", "some/reward-model", mine], {"exact-match"})
    assert names == ["mine", "exact-match", "model:some/reward-model", "mine_2"]
    assert callables == {"mine": mine, "mine_2": mine}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_nothing_is_imported_until_a_name_is_used():
    proc = run_python(
        "import sys, alignkit, alignkit_trl\n"
        "alignkit.get_plugin_manager(); alignkit.load_config('sft', {}, {})\n"
        "assert not [m for m in sys.modules if m.endswith('.trl') or m.startswith(('alignkit.trainer_facade', 'trl'))]"
        ", sorted(m for m in sys.modules if 'trl' in m or 'facade' in m)\n"
        "alignkit_trl.SFTTrainer\n"
        "assert 'alignkit_sft.trl' in sys.modules and 'alignkit_dpo.trl' not in sys.modules\n")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_unknown_name_lists_what_alignkit_offers():
    with pytest.raises(AttributeError, match="has no attribute 'PPOTrainer' .*SFTTrainer"):
        alignkit_trl.PPOTrainer  # noqa: B018


def test_bf16_defaults_on_where_the_machine_offers_it(tmp_path):
    """TRL 1.16 turns bf16 on unless fp16 (and then refuses a CPU-only machine unless use_cpu); alignkit_trl's
    configs are on where TRL's are and off (fp32) where TRL's would refuse to start."""
    import torch
    from alignkit_trl import SFTConfig

    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True
    assert SFTConfig(output_dir=str(tmp_path), fp16=False, bf16=False).bf16 is False
    if not torch.cuda.is_available():
        assert SFTConfig(output_dir=str(tmp_path)).bf16 is False
        with pytest.raises(ValueError, match="bf16/gpu"):
            trl.SFTConfig(output_dir=str(tmp_path))


@pytest.mark.parametrize(("name", "field", "value"), [("KTOConfig", "max_length", 6),
                                                      ("DPOConfig", "truncation_mode", "keep_end"),
                                                      ("GRPOConfig", "max_completion_length", 7)])
def test_a_data_field_of_the_methods_formatter_reaches_the_method(name, field, value):
    """Fields of the formatter's data config (the method config as `alignkit run` resolves it) are method keys."""
    out = getattr(alignkit_trl, name)(output_dir="x", use_cpu=True, **{field: value}).to_alignkit()
    assert out[f"method.{field}"] == value


def test_trl_trainer_conventions(tmp_path):
    """As TRL 1.x: a train_dataset is required, the model is tagged, a finite IterableDataset trains, and a dict of
    eval datasets is evaluated one by one (eval_<name>_loss)."""
    from alignkit_trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                     per_device_train_batch_size=4, disable_tqdm=True)
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        SFTTrainer("builtin:tiny", args=args)
    rows = sft_rows()
    t = SFTTrainer("builtin:tiny", args=args, train_dataset=rows.to_iterable_dataset(),
                   eval_dataset={"a": rows.select(range(4)), "b": rows.select(range(4, 8)).to_iterable_dataset()})
    assert {"trl", "sft"} <= set(t.model.model_tags)
    assert t.train().global_step == 1
    metrics = t.evaluate()
    assert {"eval_a_loss", "eval_b_loss"} <= set(metrics) and metrics["eval_a_loss"] != metrics["eval_b_loss"]


def test_ref_model_is_the_frozen_reference_model(tmp_path):
    from alignkit_trl import DPOConfig, DPOTrainer

    rows = get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort"}]))["train"].select(range(8))
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_steps=1,
                     per_device_train_batch_size=4, disable_tqdm=True, learning_rate=1e-2)
    t = DPOTrainer("builtin:tiny", args=args, train_dataset=rows)
    t.train()
    name, param = next(iter(t.model.named_parameters()))
    assert not torch.equal(param, t.ref_model.get_parameter(name))  # the policy moved, the reference did not


@pytest.mark.parametrize(("given", "expected"), [(True, "group"), (False, "none"), ("batch", "batch")])
def test_grpo_scale_rewards_takes_trls_bools(given, expected):
    from alignkit_trl import GRPOConfig

    assert GRPOConfig(output_dir="x", use_cpu=True, scale_rewards=given).to_alignkit()["method.scale_rewards"] \
        == expected == trl.GRPOConfig(output_dir="x", use_cpu=True, scale_rewards=given).scale_rewards


def test_precompute_ref_log_probs_refuses_a_stream(tmp_path):
    from alignkit_trl import DPOConfig, DPOTrainer

    rows = get_dataset(DatasetMixtureConfig(datasets=[{"path": "builtin:sort"}]))["train"].select(range(8))
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        DPOTrainer("builtin:tiny", args=args, train_dataset=rows.to_iterable_dataset())
    assert not (tmp_path / "out").exists()
