"""GRPOTrainer's TRL 1.16 surface beyond training: the helpers TRL's GRPOTrainer offers (get_high_entropy_mask,
get_off_policy_mask), computed by alignkit's GRPO objective."""

from types import SimpleNamespace

import pytest
import torch
from alignkit_trl import GRPOTrainer


def one_process():
    return SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x,
                                                       pad_across_processes=lambda x, dim, pad_index: x))


def test_high_entropy_mask_keeps_the_counted_tokens_at_or_above_the_quantile():
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # counted: 0.1 .. 0.6; their 0.5-quantile is 0.35
    got = GRPOTrainer.get_high_entropy_mask(one_process(), entropies, mask, 0.5)
    assert got.tolist() == [[False, False, False, True], [True, True, False, False]]
    assert not GRPOTrainer.get_high_entropy_mask(one_process(), entropies, torch.zeros_like(mask), 0.5).any()


def test_off_policy_mask_drops_only_negative_advantages_far_from_the_sampler():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    logps = torch.tensor([[-2.0, -2.0, -99.0], [-2.0, -2.0, -2.0], [-0.5, -0.5, -0.5]])
    advantages = torch.tensor([[-1.0], [1.0], [-1.0]])
    got = GRPOTrainer.get_off_policy_mask(advantages, logps, torch.zeros_like(logps), mask, 1.0)
    assert got.tolist() == [[0.0], [1.0], [1.0]]  # mean KL 2 (padding ignored) with a negative advantage: dropped


def prompts(n=6):
    import datasets

    return datasets.Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(n)])


def grpo(tmp_path, reward_funcs, **args):
    from alignkit_trl import GRPOConfig

    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        per_device_train_batch_size=3, num_generations=3, max_completion_length=6, max_steps=1,
                        logging_steps=1, **args)
    return GRPOTrainer("builtin:tiny", reward_funcs=reward_funcs, args=config, train_dataset=prompts())


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_each_reward_function_logs_its_mean_and_std(tmp_path, aggregation):
    calls: dict[str, list[list[float]]] = {"length": [], "letters": []}  # what each function returned, per call

    def length(completions, **kwargs):
        calls["length"].append([float(len(c)) for c in completions])
        return calls["length"][-1]

    def letters(completions, **kwargs):
        calls["letters"].append([float(len(set(c))) for c in completions])
        return calls["letters"][-1]

    t = grpo(tmp_path, [length, letters], multi_objective_aggregation=aggregation)
    t.train()
    row = t.state.log_history[0]
    for name, returned in calls.items():
        values = torch.tensor(returned[-1])  # the step's one rollout (the calls before it check the functions)
        assert row[f"rewards/{name}/mean"] == pytest.approx(values.mean().item())
        assert row[f"rewards/{name}/std"] == pytest.approx(values.std().item())  # Bessel's, as TRL's nanstd


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_sequence_level_ratios_with_a_token_summed_loss_warn_as_trl(tmp_path, caplog, loss_type):
    with caplog.at_level("WARNING"):
        grpo(tmp_path, lambda completions, **kw: [0.0] * len(completions), importance_sampling_level="sequence",
             loss_type=loss_type)
    assert ("weights each sequence by its completion length" in caplog.text) == (loss_type != "grpo")


def test_cispo_without_epsilon_high_caps_at_epsilon_as_trl(tmp_path):
    t = grpo(tmp_path, lambda completions, **kw: [0.0] * len(completions), loss_type="cispo", epsilon=0.3)
    assert t.config.method.epsilon_high == 0.3  # TRL: epsilon_high defaults to epsilon


def test_reward_functions_get_trls_trainer_state_log_metric_and_log_extra(tmp_path):
    seen = []

    def reward(completions, trainer_state, log_metric, log_extra, **kwargs):
        seen.append(trainer_state.global_step)
        log_metric("custom_accuracy", 0.75)
        log_extra("first_letters", [c[:1] for c in completions])
        return [float(len(c)) for c in completions]

    t = grpo(tmp_path, reward)
    t.train()
    assert seen[-1] == 0  # the rollout of step 1 runs before it ends
    assert t.state.log_history[0]["custom_accuracy"] == 0.75
    assert len(t._logs["extra"]["first_letters"]) > 0


def test_a_row_no_reward_function_scores_is_warned_about_as_trl(tmp_path, caplog):
    t = grpo(tmp_path, lambda completions, **kw: [None] * len(completions))
    with caplog.at_level("WARNING"):
        t.train()
    assert "All reward functions returned None for the following kwargs:" in caplog.text


def test_datasets_are_kept_as_given_as_trl_keeps_a_prompt_dataset(tmp_path):
    from alignkit_trl import GRPOConfig

    train, evals = prompts(), prompts(3).to_iterable_dataset()
    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", num_generations=3,
                        per_device_train_batch_size=3, per_device_eval_batch_size=3, dataloader_num_workers=2)
    t = GRPOTrainer("builtin:tiny", reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                    train_dataset=train, eval_dataset=evals)
    assert t.train_dataset is train and t.eval_dataset is evals
    assert t.get_train_dataloader().num_workers == 2
    assert t.get_eval_dataloader().num_workers == 0  # a stream is read by one worker (TRL: keeps its groups)
    assert next(iter(t.get_eval_dataloader()))[0]["prompt"] == "Count to 0:"


def test_a_streamed_train_set_is_read_by_one_worker_without_dispatching_batches(tmp_path):
    from alignkit_trl import GRPOConfig

    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", num_generations=3,
                        per_device_train_batch_size=3, dataloader_num_workers=2, max_steps=1)
    t = GRPOTrainer("builtin:tiny", reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                    train_dataset=prompts().to_iterable_dataset())
    assert t.args.dataloader_num_workers == 0 and t.args.accelerator_config.dispatch_batches is False
    config = GRPOConfig(output_dir=str(tmp_path / "out2"), use_cpu=True, report_to="none",
                        accelerator_config={"dispatch_batches": True})
    with pytest.raises(ValueError, match="Iterable datasets require `dispatch_batches=False`"):
        GRPOTrainer("builtin:tiny", reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                    train_dataset=prompts().to_iterable_dataset())
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(("per_device", "generations", "accumulation"), [(3, 3, 1), (6, 3, 1), (3, 6, 2)])
def test_the_batch_size_counts_completions_as_trls(tmp_path, per_device, generations, accumulation):
    """TRL's per_device_train_batch_size counts completions (per_device x accumulation per step, in whole groups)."""
    from alignkit_trl import GRPOConfig

    calls = []

    def reward(completions, **kwargs):
        calls.append(len(completions))
        return [0.0] * len(completions)

    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        per_device_train_batch_size=per_device, num_generations=generations,
                        gradient_accumulation_steps=accumulation, max_completion_length=4, max_steps=1)
    GRPOTrainer("builtin:tiny", reward_funcs=reward, args=config, train_dataset=prompts()).train()
    assert sum(calls[1:]) == per_device * accumulation  # (the first call checks the function before training)


def test_a_batch_of_partial_groups_is_refused_as_trl(tmp_path):
    from alignkit_trl import GRPOConfig

    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                        per_device_train_batch_size=4, num_generations=3)
    with pytest.raises(ValueError, match=r"generation_batch_size \(4\) must be divisible by num_generations \(3\)"):
        GRPOTrainer("builtin:tiny", reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                    train_dataset=prompts())
    assert not (tmp_path / "out").exists()


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path):
    t = grpo(tmp_path, lambda completions, **kw: [float(len(c)) for c in completions], beta=0.1, sync_ref_model=True,
             ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in t.ref_model.named_parameters()}
    t.train()
    name = "model.embed_tokens.weight"
    policy, ref = t.model.get_parameter(name), t.ref_model.get_parameter(name)
    assert not torch.equal(policy, before[name])
    assert torch.allclose(ref, 0.5 * policy + 0.5 * before[name])  # TRL's mixup: alpha * policy + (1 - alpha) * ref


def test_sync_ref_model_without_a_reference_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync_ref_model.*beta"):
        grpo(tmp_path, lambda completions, **kw: [0.0] * len(completions), sync_ref_model=True)
    assert not (tmp_path / "out").exists()



def saved_reward_model(path):
    from transformers import LlamaForSequenceClassification

    from alignkit import load_tokenizer
    from alignkit.engine.modeling import tiny_llama_config

    tok = load_tokenizer(SimpleNamespace(name_or_path="builtin:tiny", tokenizer_name_or_path=None,
                                         trust_remote_code=False, chat_template=None))
    rm = LlamaForSequenceClassification(tiny_llama_config(len(tok), num_labels=1))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_reward_models_own_tokenizer_is_taken_as_its_processing_class(tmp_path):
    from alignkit_trl import GRPOConfig
    from transformers import AutoTokenizer

    rm = saved_reward_model(tmp_path / "rm")
    own, other = AutoTokenizer.from_pretrained(rm), AutoTokenizer.from_pretrained(saved_reward_model(tmp_path / "o"))
    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", num_generations=3,
                        per_device_train_batch_size=3)
    t = GRPOTrainer("builtin:tiny", reward_funcs=rm, reward_processing_classes=own, args=config,
                    train_dataset=prompts())
    assert t.reward_processing_classes == [own]
    with pytest.raises(ValueError, match="reads a reward model with the tokenizer saved beside it"):
        GRPOTrainer("builtin:tiny", reward_funcs=rm, reward_processing_classes=other, args=config,
                    train_dataset=prompts())


def test_a_trainers_method_config_unpickles_in_a_fresh_process(tmp_path):
    """What a spawned DataLoader worker does (TRL's test_train_multiple_dataloader_workers): the method config,
    combined at run time with its data config's fields, is rebuilt there."""
    import os
    import pickle
    import subprocess
    import sys

    t = grpo(tmp_path, lambda completions, **kw: [0.0] * len(completions))
    (tmp_path / "config.pkl").write_bytes(pickle.dumps(t.config.method))
    code = f"import pickle; print(pickle.loads(open({str(tmp_path / 'config.pkl')!r}, 'rb').read()).num_generations)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "3", out.stderr[-500:]


def test_num_generations_eval_is_ignored_with_a_warning_as_it_changes_evaluation_only():
    from alignkit_trl import GRPOConfig

    with pytest.warns(UserWarning, match=r"GRPOConfig.num_generations_eval=1 is ignored by alignkit \(evaluation"):
        keys = GRPOConfig(output_dir="x", use_cpu=True, num_generations_eval=1).to_alignkit()
    assert not any("num_generations_eval" in k for k in keys)


def test_what_rewards_log_while_alignkit_checks_them_before_training_is_not_logged(tmp_path):
    def reward(completions, log_metric, log_extra, **kwargs):
        log_metric("completions_scored", len(completions))  # the check before training scores 4 empty ones
        log_extra("seen", list(completions))
        return [0.0] * len(completions)

    t = grpo(tmp_path, reward)
    t.train()
    assert t.state.log_history[0]["completions_scored"] == 3  # the step's one group of 3
