"""Hostile GRPO data and reward functions (issue 20): every mistake is one line naming the reward and the column or
row, refused while the data is read, before anything is written."""

import pytest
from click.testing import CliRunner

import alignkit
from alignkit.cli import cli
from alignkit.errors import AlignkitError
from alignkit.testing import plugin_manager
from helpers import write_jsonl

PROMPTS = [{"prompt": f"sort: {i} {i + 1} ="} for i in range(4)]
SMALL = ["method.num_generations=2", "method.max_completion_length=4", "method.sft_warmup_steps=0",
         "train.max_steps=1", "train.per_device_train_batch_size=2", "train.save_steps=null", "train.plots=false",
         "train.disable_tqdm=true"]


def refused(*args, written=None) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr (returned) and `written` must not exist."""
    result = CliRunner().invoke(cli, ["-q", *map(str, args)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("alignkit: error: "), result.stderr
    assert written is None or not written.exists(), sorted(p.name for p in written.rglob("*"))
    return lines[0]


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
    from alignkit.rewards import score

    def sometimes(prompts, completions, **kw):
        return 0.5 if completions[0] == "x" else [0.0] * len(completions)

    assert score([("s", sometimes)], ["p"], ["y"], {}).tolist() == [[0.0]]
    with pytest.raises(AlignkitError, match=r"reward 's' returned float 0.5, not a list"):
        score([("s", sometimes)], ["p"], ["x"], {})
    with pytest.raises(AlignkitError, match=r"reward 'k' reads column 'gold', which the data lacks; it has: 'answer', 'prompt'"):
        score([("k", lambda prompts, completions, **kw: kw["gold"])], ["p"], ["x"], {"answer": ["1"]})
