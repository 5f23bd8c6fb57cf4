"""What users see around training, through the CLI: progress, trackers, plots, generate, chat, --help."""

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alignkit.cli.commands import cli

pytestmark = pytest.mark.usefixtures("only_installed_orpo")


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def quick(tmp_path, *extra):
    return [f"train.output_dir={tmp_path / 'out'}", "train.max_steps=4", "train.logging_steps=2", "train.eval_steps=2",
            "data.max_train_samples=24", "data.max_eval_samples=8", "train.per_device_eval_batch_size=4",
            "train.eval_on_start=false", "train.save_steps=null", *extra]


def png_description(path) -> str:
    """A PNG's tEXt Description chunk, read by hand (and the file must open as a PNG)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8:pos + 8 + length].partition(b"\0")
            if key == b"Description":
                return value.decode("latin-1")
        pos += 12 + length
    return ""


# ---- plots ---------------------------------------------------------------------------------------------

def test_plot_draws_one_panel_per_metric_family_with_train_and_eval(tmp_path):
    """Generic over metric names: *loss together, X/chosen with X/rejected, others alone."""
    rows = [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "nll_loss": 1.5 / s, "score/chosen": s, "score/rejected": -s,
             "acc": s / 4} for s in (1, 2, 3, 4)]
    rows += [{"step": s, "epoch": s / 10, "eval_loss": 2.5 / s, "eval_score/chosen": s, "eval_score/rejected": -s,
              "eval_acc": 0.5} for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("plot", str(tmp_path))
    assert result.exit_code == 0
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert files == ["acc.png", "loss.png", "overview.png", "score.png"]
    assert result.output.split() == [str(tmp_path / "plots" / n)
                                     for n in ("loss.png", "score.png", "acc.png", "overview.png")]
    assert png_description(tmp_path / "plots" / "overview.png") == "panels: loss, score, acc"
    assert png_description(tmp_path / "plots" / "score.png") == "panels: score"


def test_plot_errors_name_the_file(tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"alignkit: error: {tmp_path / 'metrics.jsonl'}: no such file; give the "
                                     "output_dir of an alignkit run")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2,\n')
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])  # a torn line (a crash mid-write) is skipped, counted
    assert result.exit_code == 0
    assert f"{tmp_path / 'metrics.jsonl'}: skipped 1 of 2 lines" in result.stderr and "(first: line 2)" in result.stderr


def test_training_shows_progress_and_ends_with_charts(tmp_path):
    result = invoke("run", "--method", "orpo", *quick(tmp_path))
    assert result.exit_code == 0
    err = result.stderr
    assert "formatting train data" in err  # the preprocessing bar
    assert "training: 100%" in err and "4/4" in err and "loss=" in err and "rewards/accuracies=" in err
    assert "it/s" in err or "s/it" in err
    panels = png_description(tmp_path / "out" / "plots" / "overview.png").removeprefix("panels: ").split(", ")
    assert {"loss", "rewards", "rewards/margins", "rewards/accuracies", "logps", "logits",
            "log_odds_chosen"} <= set(panels)
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) == len(panels) + 1


def test_quiet_hides_progress(tmp_path):
    result = invoke("-q", "run", "--method", "orpo", *quick(tmp_path))
    assert result.exit_code == 0
    assert "training" not in result.stderr and "formatting" not in result.stderr


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = invoke("-q", "run", "--method", "orpo", *quick(tmp_path, "train.report_to=[tensorboard]",
                                                             "train.run_name=exp1", "train.plots=false"))
    assert result.exit_code == 0
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events and all("exp1" in e.parts for e in events)
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        scalars.update({tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    assert scalars["train/loss"] == pytest.approx(train_losses, rel=1e-6)
    assert len(scalars["eval/rewards/accuracies"]) == 2 and "train/learning_rate" in scalars


# ---- generate and chat ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A briefly trained demo model (an untrained one only repeats a newline)."""
    import alignkit
    from helpers import fast

    return alignkit.run("orpo", fast(tmp_path_factory.mktemp("run"), max_steps=8, learning_rate=3e-3)).output_dir


def greedy_reply(model_dir, messages, n):
    """The reply the test computes itself: BOS and the chat template (as ORPO's formatter), then greedy generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[tok.bos_token_id] + tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_streams_the_greedy_completion(model_dir):
    result = invoke("generate", "--model", str(model_dir), "--chat-template", "--temperature", "0", "--max-new-tokens",
                    "8",
                    "sort: 3 1 =")
    assert result.exit_code == 0
    expected = greedy_reply(model_dir, [{"role": "user", "content": "sort: 3 1 ="}], 8)
    assert expected.strip() and result.stdout == expected + "\n"


def test_chat_keeps_history_and_obeys_commands(model_dir):
    turns = "sort: 3 1 =\nsort: 9 4 =\n/clear\nsort: 9 4 =\n/nope\n/exit\nnever read\n"
    result = invoke("chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6", input=turns)
    assert result.exit_code == 0
    replies = [line.split("assistant: ", 1)[1] for line in result.stdout.splitlines() if "assistant: " in line]
    first = greedy_reply(model_dir, [{"role": "user", "content": "sort: 3 1 ="}], 6)
    second = greedy_reply(model_dir,
                          [{"role": "user", "content": "sort: 3 1 ="}, {"role": "assistant", "content": first},
                           {"role": "user", "content": "sort: 9 4 ="}], 6)
    fresh = greedy_reply(model_dir, [{"role": "user", "content": "sort: 9 4 ="}], 6)
    assert first.strip() and replies == [first, second, fresh]
    assert "(history cleared)" in result.stdout and "unknown command /nope" in result.stdout


def test_generate_and_chat_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--model", "no-such-dir", "hi"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "alignkit: error: --model no-such-dir: no such folder (give a run's output_dir or a hub name owner/name)"]
    result = CliRunner().invoke(cli, ["chat"])
    assert result.exit_code == 2 and "Missing option '--model'" in result.output


# ---- help ----------------------------------------------------------------------------------------------

def test_every_command_has_help_with_examples():
    assert set(cli.commands) >= {"run", "eval", "methods", "config", "format", "plot", "generate", "chat"}
    for name in cli.commands:
        result = invoke(name, "--help")
        assert result.exit_code == 0
        examples = [line.strip() for line in result.output.splitlines() if line.strip().startswith(f"alignkit {name}")]
        assert examples, f"`alignkit {name} --help` shows no example"


def test_conversation_renders_the_history_and_system_message():
    from alignkit.cli.generate import Conversation
    from alignkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    conversation = Conversation(tok, system="Be brief.")
    conversation.prompt_ids("first question")
    conversation.reply("first answer")
    text = tok.decode(conversation.prompt_ids("second question")[0])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"}]
    assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    conversation.clear()
    assert "first" not in tok.decode(conversation.prompt_ids("again")[0])


def test_generate_names_the_folder_that_holds_no_model(tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path), "hi"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"alignkit: error: --model cannot load the tokenizer from {tmp_path}")
