"""Hostile GRPO data and reward functions (issue 20): every mistake is one line naming the reward and the column or
row, refused while the data is read, before anything is written."""

import pytest

import alignkit
from alignkit.errors import AlignkitError
from alignkit.testing import plugin_manager
from helpers import refused, write_jsonl

PROMPTS = [{"prompt": f"sort: {i} {i + 1} ="} for i in range(4)]
SMALL = ["method.num_generations=2", "method.max_completion_length=4", "method.sft_warmup_steps=0",
         "train.max_steps=1", "train.per_device_train_batch_size=2", "train.save_steps=null", "train.plots=false",
         "train.disable_tqdm=true"]


def test_exact_match_on_prompts_without_an_answer_column_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    line = refused("run", "-m", "grpo", f"train.output_dir={tmp_path / 'out'}", f"data.train={data}",
                   "method.reward_funcs=[exact-match]", *SMALL, written=tmp_path / "out")
    assert "reward 'exact-match' reads column 'answer', which the data lacks" in line, line
    assert "it has: 'prompt'" in line and "method.reward_funcs" in line, line


class Rewards:
    """A plugin whose rewards break each rule a reward function must follow."""

    @alignkit.hookimpl
    def register_rewards(self, register):
        register("a-float", lambda prompts, completions, **kw: 1.0)
        register("nothing", lambda prompts, completions, **kw: None)
        register("huge", lambda prompts, completions, **kw: [10 ** 400] * len(completions))
        register("needs-gold", lambda prompts, completions, gold, **kw: [0.0] * len(completions))
        register("reads-gold", lambda prompts, completions, **kw: [float(g == c) for g, c in zip(kw["gold"],
                                                                                                  completions)])


@pytest.mark.parametrize("reward, message", [
    ("a-float", "reward 'a-float' returned float 1.0, not a list; return one reward per completion"),
    ("nothing", "reward 'nothing' returned NoneType None, not a list; return one reward per completion"),
    ("huge", "reward 'huge' returned an integer too large for a float (10000000000"),
    ("needs-gold", "reward 'needs-gold' reads column 'gold', which the data lacks; it has: 'prompt'"),
    ("reads-gold", "reward 'reads-gold' reads column 'gold', which the data lacks; it has: 'prompt'"),
])
def test_a_broken_reward_function_is_one_line_before_any_write(tmp_path, reward, message):
    import alignkit_grpo

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    pm = plugin_manager(alignkit_grpo, Rewards())
    with pytest.raises(AlignkitError) as e:
        alignkit.run("grpo", plugins=pm, **{**_typed(), "train.output_dir": str(tmp_path / "out"), "data.train": data,
                                            "method.reward_funcs": [reward]})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def _typed() -> dict:
    return {"method.num_generations": 2, "method.max_completion_length": 4, "method.sft_warmup_steps": 0,
            "train.max_steps": 1, "train.per_device_train_batch_size": 2, "train.save_steps": None,
            "train.plots": False, "train.disable_tqdm": True}


def test_score_names_the_reward_when_it_breaks_during_training():
    """The same checks hold for every rollout (a reward may break only on some completions)."""
    from alignkit.online.rewards import score

    def sometimes(prompts, completions, **kw):
        return 0.5 if completions[0] == "x" else [0.0] * len(completions)

    assert score([("s", sometimes)], ["p"], ["y"], {}).tolist() == [[0.0]]
    with pytest.raises(AlignkitError, match=r"reward 's' returned float 0.5, not a list"):
        score([("s", sometimes)], ["p"], ["x"], {})
    with pytest.raises(AlignkitError,
                       match=r"reward 'k' reads column 'gold', which the data lacks; it has: 'answer', 'prompt'"):
        score([("k", lambda prompts, completions, **kw: kw["gold"])], ["p"], ["x"], {"answer": ["1"]})


def test_the_warmup_cache_is_keyed_by_code_and_version(tmp_path, monkeypatch):
    """A cache left by another version (or by this one before its key covered code and version) is not reused."""
    import hashlib

    import torch
    from alignkit_grpo import GRPOConfig, GRPOFormatter
    from alignkit_grpo import formatter as grpo_formatter
    from safetensors.torch import save_file

    from alignkit.testing import tiny_model, tiny_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "alignkit" / "grpo-warmup"
    assert "$XDG_CACHE_HOME/alignkit/grpo-warmup" in GRPOConfig.model_fields["sft_warmup_steps"].description
    calls = []
    real = grpo_formatter.sft_warmup
    monkeypatch.setattr(grpo_formatter, "sft_warmup", lambda *a, **k: (calls.append(1), real(*a, **k)))
    cfg = alignkit.get_method("grpo").config(sft_warmup_steps=2)
    # the key the previous version used (class name, steps, weights): a stale cache there must not be loaded
    model = tiny_model()
    h = hashlib.sha256(f"{type(model).__name__}:2".encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    folder.mkdir(parents=True)
    save_file({k: torch.zeros_like(v).contiguous() for k, v in model.state_dict().items()},
              str(folder / f"{h.hexdigest()[:16]}.safetensors"))
    GRPOFormatter(cfg, tiny_tokenizer()).prepare_model(model)
    assert calls == [1] and any(p.abs().sum() > 0 for p in model.state_dict().values())
    GRPOFormatter(cfg, tiny_tokenizer()).prepare_model(tiny_model())
    assert calls == [1]  # the same version and code: loaded from the cache
    monkeypatch.setattr(alignkit, "__version__", "0.0.0-other")
    GRPOFormatter(cfg, tiny_tokenizer()).prepare_model(tiny_model())
    assert calls == [1, 1]  # another version: trained again, not the other version's cache


def test_an_answer_column_null_in_every_row_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{**row, "answer": None} for row in PROMPTS])
    line = refused("run", "-m", "grpo", f"train.output_dir={tmp_path / 'out'}", f"data.train={data}",
                   "method.reward_funcs=[exact-match]", *SMALL, written=tmp_path / "out")
    assert "reward 'exact-match' reads column 'answer', which is null in every row" in line, line


def test_a_reward_parameter_with_a_default_is_optional():
    from alignkit.online.rewards import call_reward, columns_read

    def capped(prompts, completions, answer, max_chars=None, **columns):
        return [float(len(c) <= (max_chars[i] if max_chars else 3)) for i, c in enumerate(completions)]

    assert columns_read(capped) == ["answer"]
    assert call_reward("capped", capped, ["p", "p"], ["ab", "abcd"], {"answer": ["x", "y"]}) == [1.0, 0.0]
    with pytest.raises(AlignkitError, match="reads column 'answer'"):
        call_reward("capped", capped, ["p"], ["ab"], {"max_chars": [5]})
