"""Issue 21, online capabilities through the public API: a rollout samples the reference/teacher (gap 4), the core's
rewards and public scoring (gap 5), per-token precomputed reference outputs (gap 7), the rollout Protocol."""

import online_teacher_method
import pytest
import torch

import alignkit
from alignkit.config import ModelConfig
from alignkit.engine.modeling import tiny_llama_config
from alignkit.testing import plugin_manager
from helpers import fast, read_jsonl, write_jsonl

PROMPTS = [{"prompt": f"sort: {i} {(i * 3) % 7} {(i * 5) % 9} ="} for i in range(8)]


def greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def teacher_and_policy(tmp_path):
    """A tiny teacher saved with weights of its own, and the policy the run builds (builtin:tiny, seed 42)."""
    from transformers import AutoModelForCausalLM

    tokenizer = alignkit.load_tokenizer(ModelConfig())
    torch.manual_seed(123)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).eval()
    with torch.no_grad():  # weights far from the init's (whose greedy decoding repeats the prompt's last token)
        for param in teacher.parameters():
            param.normal_(0.0, 0.3)
    teacher.save_pretrained(tmp_path / "teacher")
    torch.manual_seed(42)
    policy = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).eval()
    return teacher, policy, tokenizer


def pm():
    return plugin_manager(online_teacher_method)


@pytest.mark.parametrize("lora, for_model", [(False, False), (True, True)])
def test_a_rollout_samples_the_teacher_through_the_generation_handle(tmp_path, lora, for_model):
    teacher, policy, tokenizer = teacher_and_policy(tmp_path)
    online_teacher_method.TeacherRollout.sampled = []
    config = fast(tmp_path, max_steps=1, per_device_train_batch_size=4, seed=42)
    config["data"] = {"train": write_jsonl(tmp_path / "p.jsonl", PROMPTS), "max_eval_samples": 4}
    config["model"] = {"ref_name_or_path": str(tmp_path / "teacher"),
                       **({"peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]}} if lora else {})}
    config["method"] = {"use_for_model": for_model}
    alignkit.run("teacher-kd", config, plugins=pm())
    sampled = online_teacher_method.TeacherRollout.sampled
    assert len(sampled) >= 4
    differs = 0
    for prompt, completion in sampled:
        assert completion == greedy(teacher, prompt, 6, tokenizer.eos_token_id)  # the teacher's tokens ...
        differs += completion != greedy(policy, prompt, 6, tokenizer.eos_token_id)  # ... not the policy's
    assert differs >= 3, sampled


class NoWrap:
    """Stands in for accelerate: nothing to unwrap."""

    @staticmethod
    def unwrap_model(model):
        return model


def test_the_implicit_reference_of_a_lora_policy_is_sampled_with_its_adapters_off():
    from peft import LoraConfig, get_peft_model

    from alignkit.errors import PluginError
    from alignkit.online.generation import Generator
    from alignkit.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_model(seed=1)
    prompt = tok("sort: 3 1 2 =", add_special_tokens=False)["input_ids"]
    base_tokens = greedy(base.eval(), prompt, 6, tok.eos_token_id)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    policy = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 2.0)
    generator = Generator(policy, NoWrap(), tok, seed=0)
    generator.add_model("reference", policy, adapters_off=True)
    args = {"n": 1, "max_new_tokens": 6, "temperature": 0.0}
    assert generator.models == ["policy", "reference"]
    assert generator.generate([prompt], model="reference", **args) == [[base_tokens]]
    assert generator.for_model("reference").generate([prompt], **args) == [[base_tokens]]
    assert generator.generate([prompt], **args) != [[base_tokens]]  # the adapters are on for the policy
    assert generator.generate([prompt], **args) == generator.generate([prompt], model="policy", **args)
    with pytest.raises(PluginError, match=r"generator: no model 'teacher' to sample; loaded: policy, reference"):
        generator.generate([prompt], model="teacher", **args)
    with pytest.raises(PluginError, match="not a free model name"):
        generator.add_model("policy", base)


# ---- gap 5: public reward scoring, and the common rewards the core registers for any online method ---------------

def test_the_core_registers_the_common_rewards_for_any_online_method():
    from alignkit.online import RewardRegistry

    registry = RewardRegistry.from_plugins(plugin_manager(online_teacher_method))  # no GRPO loaded
    assert {"exact-match", "regex-match", "length-penalty"} <= set(registry.functions)
    assert {registry.functions[n][1] for n in ("exact-match", "regex-match", "length-penalty")} == {"alignkit"}
    import alignkit_grpo

    with_grpo = RewardRegistry.from_plugins(plugin_manager(alignkit_grpo))  # GRPO adds only its demo's rewards
    assert {n: s for n, (_, s) in with_grpo.functions.items()} == {
        "exact-match": "alignkit", "regex-match": "alignkit", "length-penalty": "alignkit",
        "sort-order": "alignkit_grpo", "digits-format": "alignkit_grpo"}


def test_the_common_rewards_score_through_the_public_scorer():
    from alignkit.online import RewardRegistry, score

    funcs = RewardRegistry.from_plugins(plugin_manager()).select(["exact-match", "regex-match", "length-penalty"])
    completions = [" 1 2 3", "<a>x\ny</a>  ", "no", "x" * 15]
    columns = {"answer": ["1 2 3", "1", None, "x"], "pattern": [r"\d( \d)*", r"<a>.*</a>", None, "x+"],
               "max_chars": [10, None, 0, 10]}
    out = score(funcs, ["p"] * 4, completions, columns)
    nan = float("nan")
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, nan], [nan, nan, -0.02], [0.0, 1.0, -0.05]])
    assert torch.allclose(out, expected, equal_nan=True), out


def test_call_reward_and_the_fixed_setting_rewards_refuse_what_they_must():
    from alignkit.errors import ConfigError, DataError, PluginError
    from alignkit.online import call_reward, length_penalty, length_penalty_reward, regex_match, regex_reward

    assert call_reward("fmt", regex_reward(r"<a>\d</a>"), ["p", "q"], ["<a>1</a>\n", "<a>12</a>"], {}) == [1.0, 0.0]
    assert call_reward("short", length_penalty_reward(2), ["p", "q"], ["abcd", "a"], {}) == [-0.02, 0.0]
    with pytest.raises(PluginError, match=r"reward 'nan' returned nan for row 1 \(prompt 'q', completion 'b'\)"):
        call_reward("nan", lambda prompts, completions: [0.0, float("nan")], ["p", "q"], ["a", "b"], {})
    with pytest.raises(PluginError, match="reward 'short' returned 1 rewards for 2 completions"):
        call_reward("short", lambda prompts, completions: [0.0], ["p", "q"], ["a", "b"], {})
    with pytest.raises(PluginError, match="reward 'regex-match' reads column 'pattern', which the data lacks"):
        call_reward("regex-match", regex_match, ["p"], ["a"], {"answer": ["a"]})
    with pytest.raises(PluginError, match="reward 'length-penalty' reads column 'max_chars', which the data lacks"):
        call_reward("length-penalty", length_penalty, ["p"], ["a"], {})
    with pytest.raises(DataError, match=r"reward 'regex-match', row 1, column 'pattern': '\(' is not a regular exp"):
        regex_match(["p", "q"], ["a", "b"], pattern=["a", "("])
    with pytest.raises(ConfigError, match=r"regex_reward: '\[' is not a regular expression"):
        regex_reward("[")


def test_a_bad_pattern_in_the_data_is_one_line_before_any_write(tmp_path):
    from click.testing import CliRunner

    from alignkit.cli.commands import cli

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "sort: 2 1 =", "pattern": "(\\d"}] * 4)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "run", "-m", "grpo", f"train.output_dir={out}", f"data.train={data}",
                                      "method.reward_funcs=[regex-match]", "method.num_generations=2",
                                      "method.max_completion_length=4", "train.max_steps=1"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "reward 'regex-match', row 0, column 'pattern'" in lines[0], lines
    assert not out.exists()


# ---- gap 7: precomputed reference outputs may be per-token tensors of varying length -------------------------------

@pytest.mark.parametrize("eval_batch", [8, 3])
def test_per_token_reference_outputs_precomputed_give_the_live_loss(tmp_path, eval_batch):
    import per_token_reference_method

    from toy_method import toy_rows

    rows = toy_rows("train")[:24]
    assert len({len(r["completion"]) for r in rows}) > 1  # rows of varying length
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    losses = {}
    for precompute in (False, True):
        config = fast(tmp_path / str(precompute), max_steps=3, per_device_eval_batch_size=eval_batch)
        config["data"] = {"train": data, "eval": data, "max_eval_samples": 8}
        config["method"] = {"precompute": precompute}
        result = alignkit.run("per-token-ref", config, plugins=plugin_manager(per_token_reference_method.Plugin()))
        logs = [r for r in read_jsonl(result.output_dir / "metrics.jsonl") if "loss" in r]
        losses[precompute] = [v for r in logs for v in (r["loss"], r["ref_sum"])] + [result.metrics["eval_loss"]]
    assert len(losses[True]) == 7
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# ---- the rollout Protocol, checked at registration -----------------------------------------------------------------

class NoCall:
    def __init__(self, config, tokenizer):
        pass


class OneArgCtor:
    def __init__(self, config):
        pass

    def __call__(self, batch, ctx):
        return batch


class NoCtx:
    def __init__(self, config, tokenizer):
        pass

    def __call__(self, batch):
        return batch


class BadFinish(online_teacher_method.TeacherRollout):
    finish = 3


@pytest.mark.parametrize("rollout, message", [
    (NoCall, r"its instances are not callable as rollout\(batch, ctx\)"),
    (OneArgCtor, r"cannot be built as NAME\(config, tokenizer\)"),
    (NoCtx, r"__call__ takes no \(batch, ctx\)"),
    (BadFinish, "finish is int, not a method finish"),
    (online_teacher_method.TeacherRollout(online_teacher_method.TeacherConfig(), None), "is an instance"),
])
def test_a_rollout_that_breaks_the_protocol_is_one_line_at_registration(rollout, message):
    import dataclasses

    from alignkit.errors import PluginError

    class Plugin:
        @alignkit.hookimpl
        def register_methods(self, register):
            register(dataclasses.replace(online_teacher_method.METHOD, rollout=rollout))

    with pytest.raises(PluginError, match=message) as e:
        alignkit.methods(plugin_manager(Plugin()))
    assert "\n" not in str(e.value) and "method 'teacher-kd'" in str(e.value), str(e.value)


def test_the_shipped_rollouts_satisfy_the_protocol():
    import alignkit_grpo

    from alignkit.online import Rollout

    assert issubclass(alignkit_grpo.GRPORollout, Rollout) and issubclass(online_teacher_method.TeacherRollout, Rollout)
    assert [m.name for m in alignkit.methods(plugin_manager(alignkit_grpo, online_teacher_method))] == ["grpo",
                                                                                                        "teacher-kd"]
