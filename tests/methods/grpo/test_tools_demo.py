"""The tools demo (issue 24 item 4): builtin:arithmetic, the calculator's worked episodes for the warm-up, and
configs/grpo-tools-demo.yaml learning to call the tool (slow)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignkit.online.calculator import CalculatorEnvironment, arithmetic_rows, calculate, demonstrations
from alignkit.online.environments import ToolOptions
from helpers import ROOT, read_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402


def test_arithmetic_data_is_two_digit_products_with_disjoint_splits():
    train, test = arithmetic_rows("train"), arithmetic_rows("test")
    assert len(train) == 2000 and len(test) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for row in train[:50] + test[:50]:
        a, b = row["prompt"].removeprefix("what is ").removesuffix("?").split("*")
        assert 11 <= int(a) <= 99 and 11 <= int(b) <= 99 and row["answer"] == str(int(a) * int(b))


def test_worked_episodes_call_the_tool_or_guess_wrong():
    episodes = demonstrations(tool_share=0.3)
    with_tool = [e for e in episodes if len(e) == 4]
    assert 0.25 < len(with_tool) / len(episodes) < 0.35
    for user, call, result, answer in with_tool[:20]:
        env = CalculatorEnvironment()
        observation, _, done = env.step(call)
        assert observation == [result] and not done and answer["content"] == result["content"]
        assert answer["content"] == calculate(user["content"].removeprefix("what is ").removesuffix("?"))
    guesses = [e for e in episodes if len(e) == 2]
    assert all(CalculatorEnvironment().step(a) == (None, {"tool_call": 0.0}, True) for _, a in guesses[:20])


def test_without_tool_descriptions_the_prompt_is_only_the_conversation(tok):
    assert CalculatorEnvironment(ToolOptions(describe_tools=False)).tool_schemas == []
    assert CalculatorEnvironment().tool_schemas[0]["function"]["name"] == "calculate"


@pytest.mark.slow
def test_the_tools_demo_learns_to_call_the_calculator_and_use_its_result(tmp_path):
    """`alignkit run -c configs/grpo-tools-demo.yaml` (issue 24 item 4): within 10 minutes (warm-up included) the
    held-out reward rises by >= 0.3, the share of held-out episodes with a well-formed tool call rises from its
    warm-up level to above 0.5, and part of the gain is right answers (exact-match: the answer uses the tool's
    result), not only the tool-call bonus (0.5, not raised); with plots of the reward and the turns per episode."""
    env = readme_figures.demo_env({  # the figures' thread count: the README's numbers exactly
        **os.environ, "PYTHONPATH": ":".join([str(ROOT), *map(str, sorted((ROOT / "plugins").glob("*/")))]),
        "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-grpo"}, cache=tmp_path / "cache")
    config = ROOT / "configs" / "grpo-tools-demo.yaml"
    assert yaml.safe_load(config.read_text())["method"]["environment_options"]["call_reward"] == 0.5
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "alignkit", "-q", "run", "-c", str(config),
                           f"train.output_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1500)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    evals = [r for r in rows if "eval_reward" in r]
    assert evals[0]["step"] == 0
    used = [e["eval_episodes/tool_used/mean"] for e in evals]
    assert used[0] < 0.5 < used[-1], used
    rewards = [e["eval_reward"] for e in evals]
    assert rewards[-1] - rewards[0] >= 0.3, rewards
    exact = [e["eval_rewards/exact-match/mean"] for e in evals]
    assert exact[-1] - exact[0] >= 0.1, exact
    readme_figures.assert_demo_matches("grpo-tools", tmp_path / "out" / "metrics.jsonl")
    plots = Path(tmp_path / "out" / "plots")
    assert (plots / "reward.png").is_file() and (plots / "episodes_turns_mean.png").is_file()
    assert elapsed < 600 or os.getloadavg()[0] > 3, elapsed
