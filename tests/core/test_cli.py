"""Every command through the CLI, as a user sees it: output, files, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import alignkit
from alignkit.cli.commands import cli
from test_registry import install_fake_dist

pytestmark = pytest.mark.usefixtures("only_installed_orpo")


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def quick(tmp_path, name="out"):
    return [f"train.output_dir={tmp_path / name}", "train.max_steps=3", "data.max_train_samples=24",
            "data.max_eval_samples=10", "train.per_device_eval_batch_size=4", "train.disable_tqdm=true",
            "train.eval_on_start=false", "train.save_steps=null"]


def test_methods():
    result = invoke("methods")
    assert result.exit_code == 0
    assert result.output.split()[:3] == ["orpo", "alignkit", alignkit.__version__]
    assert "Odds Ratio Preference Optimization" in result.output


def test_config_prints_yaml_that_c_accepts(tmp_path):
    printed = invoke("config", "--method", "orpo", "method.beta=0.3")
    assert printed.exit_code == 0 and "  beta: 0.3" in printed.output and "# Weight of the odds-ratio" in printed.output
    path = tmp_path / "c.yaml"
    path.write_text(printed.output)
    assert invoke("config", "-c", str(path)).output == printed.output


def test_run_then_eval_reproduces_the_final_eval(tmp_path):
    run = invoke("run", "--method", "orpo", *quick(tmp_path))
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert summary["global_step"] == 3 and 0 <= summary["eval_rewards/accuracies"] <= 1

    ev = invoke("eval", "-m", "orpo", f"model.name_or_path={tmp_path / 'out'}", *quick(tmp_path, "eval"))
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(ev.stdout)
    expected = {"eval_loss", "eval_nll_loss", "eval_log_odds_ratio", "eval_log_odds_chosen", "eval_rewards/chosen",
                "eval_rewards/rejected", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
                "eval_logps/rejected", "eval_logits/chosen", "eval_logits/rejected"}
    assert set(metrics) == expected
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text()) == metrics
    for key in expected:  # the saved model on the same eval data and batch size gives the run's final eval
        assert metrics[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-6), key


def test_eval_without_eval_data_uses_train_data(tmp_path):
    rows = [{"prompt": f"sort: {a} {b} =", "chosen": f" {min(a, b)} {max(a, b)}",
             "rejected": f" {max(a, b)} {min(a, b)}"}
            for a, b in [(3, 1), (5, 2), (9, 4)]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = invoke("eval", "-m", "orpo", f"data.train={data}", f"train.output_dir={tmp_path}")
    assert ev.exit_code == 0, ev.output
    assert "eval_loss" in json.loads(ev.stdout)


@pytest.mark.parametrize("args, message", [
    (["run", "--method", "opro"], "unknown method 'opro' (did you mean 'orpo'?); registered: orpo"),
    (["run", "-m", "orpo", "train.learnig_rate=1"], "unknown key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
    (["run", "-m", "orpo", "max_steps"], "argument 'max_steps' must be KEY=VALUE"),
    (["run", "-m", "orpo", "data.train=missing.jsonl"], "missing.jsonl: no such file"),
    (["eval", "-m", "orpo", "model.name_or_path=no_such_model"],
     "model.name_or_path: no_such_model: no such local folder, and the Hugging Face hub"),
    (["config"], "no method given: pass --method NAME or set method.name; registered: orpo"),
    (["config", "-m", "orpo", "-c", "nope.yaml"], "config file nope.yaml does not exist"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"alignkit: error: {message}"] or (
        message in result.stderr and len(result.stderr.strip().splitlines()) == 1), result.stderr
    assert not (tmp_path / "outputs").exists()


CRASHING_PLUGIN = """
    import alignkit

    @alignkit.hookimpl
    def on_train_start(run):
        raise RuntimeError("bug in a plugin")
"""


def test_crash_is_exit_code_1_with_traceback(tmp_path):
    install_fake_dist(tmp_path, "alignkit-crash", "crash", "alignkit_crash_mod", CRASHING_PLUGIN)
    env = {"PYTHONPATH": str(tmp_path), "ALIGNKIT_LOAD_PLUGINS": "alignkit,alignkit-crash", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "alignkit", "-q", "run", "-m", "orpo", *quick(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: bug in a plugin" in proc.stderr


def test_python_dash_m_and_help():
    proc = subprocess.run([sys.executable, "-m", "alignkit", "methods"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("orpo")
    for command in ("run", "eval", "config", "methods"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage: cli " + command in result.output.replace("alignkit", "cli")
    assert "alignkit run --method NAME" in invoke("run", "--help").output
