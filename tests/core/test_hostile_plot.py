"""Hostile metrics files for `alignkit plot` (issue 20): no traceback; bad lines skipped with a counted warning
naming the file and line, or one line when nothing can be drawn."""

import json

import pytest
import torch
from click.testing import CliRunner

from alignkit.cli.commands import cli
from helpers import ROOT

GOOD = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 3, "loss": 1.0}]


def plot(tmp_path, lines: list[str | bytes]):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    (run / "metrics.jsonl").write_bytes(data)
    return CliRunner().invoke(cli, ["-q", "plot", str(run), "-o", str(tmp_path / "charts")]), run / "metrics.jsonl"


def good_lines() -> list[str]:
    return [json.dumps(r) for r in GOOD]


@pytest.mark.parametrize("bad, first", [
    (['{"loss": 3.0}'], 1),                                    # no step
    (['[1, 2, 3]', '7', '"text"', 'null'], 1),                 # not objects
    (['{"step": {"n": 1}, "loss": 3.0}', '{"step": "4", "loss": 3.0}'], 1),  # a step that is not a number
    (['{"step": 0, "lo'], 1),                                  # torn first line
    ([b'{"step": 0, "loss": 1.0, "x": "\xff\xfe"}'], 1),        # not UTF-8
])
def test_bad_lines_are_skipped_with_a_counted_warning(tmp_path, bad, first):
    result, path = plot(tmp_path, bad + good_lines())
    assert result.exit_code == 0, result.output
    assert result.exception is None
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == [f"{path}: skipped {len(bad)} of {len(bad) + 3} lines that are not JSON "
                        f"objects with a numeric 'step' (first: line {first})"]
    assert (tmp_path / "charts" / "loss.png").is_file() and (tmp_path / "charts" / "overview.png").is_file()


def test_nested_values_are_left_out_of_the_charts(tmp_path):
    rows = [{"step": 1, "loss": 2.0, "rewards": {"chosen": 1.0}, "tags": ["a"], "note": "x", "ok": True,
             "huge": 10 ** 400}, *GOOD[1:]]
    result, _ = plot(tmp_path, [json.dumps(r) for r in rows])
    assert result.exit_code == 0, result.output
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir() if not p.name.startswith("."))  # not the manifest
    assert charts == ["loss.png", "ok.png", "overview.png"]


@pytest.mark.parametrize("lines", [['{"loss": 1.0}', '{"loss": 2.0}'], ['[1]', '{"step": 1, "lo']])
def test_a_file_with_nothing_to_draw_is_one_line(tmp_path, lines):
    result, path = plot(tmp_path, lines)
    assert result.exit_code == 2 and result.exception is not None and not isinstance(result.exception, KeyError)
    errors = [line for line in result.stderr.splitlines() if line.startswith("alignkit: error: ")]
    assert errors == [f"alignkit: error: {path}: no line is a JSON object with a numeric 'step' and a metric "
                      f"({len(lines)} lines)"]
    assert not (tmp_path / "charts").exists()


# ---- output hygiene of a training run ------------------------------------------------------------------

def quick_run(tmp_path, method: str, *flags):
    args = [*flags, "run", "--method", method, f"train.output_dir={tmp_path / 'out'}", "train.max_steps=4",
            "train.logging_steps=2", "train.eval_steps=2", "data.max_train_samples=24", "data.max_eval_samples=8",
            "train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=4", "train.eval_on_start=false",
            "train.save_steps=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("method", ["orpo", "dpo"])
def test_checkpoints_save_tied_weights_without_a_warning(tmp_path, method):
    """Every checkpoint printed `Removed shared tensor {'lm_head.weight'} while saving` (twice for DPO), even with -q:
    the tied embedding is expected. The checkpoints must still hold the weights (they resume)."""
    for flags in ((), ("-q",)):
        result = quick_run(tmp_path / "-".join(flags or ("plain",)), method, *flags)
        assert "Removed shared tensor" not in result.stderr and "shared tensor" not in result.output
    saved = tmp_path / "-q" / "out" / "checkpoints" / "checkpoint-2" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()


def test_a_shared_tensor_that_is_not_tied_is_still_reported(caplog):
    """The filter is precise: accelerate's warning about tensors that are not the model's tied weights passes."""
    import logging

    from alignkit.engine.checkpoint import tied_weights_expected

    model = torch.nn.Linear(2, 2)
    with tied_weights_expected([model]):
        logging.getLogger("accelerate.utils.other").warning("Removed shared tensor {'other.weight'} while saving. x")
    assert "other.weight" in caplog.text


def test_the_final_progress_bar_is_printed_once(tmp_path):
    result = quick_run(tmp_path, "orpo")
    finals = [line for line in result.stderr.split("\n") if "training: 100%" in line]
    assert len(finals) == 1, finals
    assert "step 2: eval_" in result.stderr and "step 4: eval_" in result.stderr  # the eval lines still show


def test_the_example_script_help_shows_descriptions_and_defaults():
    """`python examples/orpo.py --help` listed ~150 bare flags: each one now says what it does and its default."""
    import re
    import subprocess
    import sys

    script = ROOT / "examples" / "orpo.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    options = [" ".join(o.split()) for o in re.split(r"\n  (?=--)", out.stdout.split("options:", 1)[1])[1:]]
    bare = [o.split()[0] for o in options if "(default:" not in o or len(o.split("(default:")[0].split()) < 4]
    assert len(options) > 100 and not bare, bare[:10]
    beta = next(o for o in options if o.startswith("--beta "))
    assert "(default: 0.1)" in beta and "odds" in beta.lower()
    lr = next(o for o in options if o.startswith("--learning_rate "))
    assert "(default: 1e-06)" in lr
