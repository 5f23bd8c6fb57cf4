"""Every user mistake is one line and exit code 2, before any work, with nothing written (issue 12, items
5, 9-16): through the CLI in-process, so each case costs no interpreter start."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner

import alignkit
from alignkit.cli.commands import cli
from alignkit.engine.loop import Engine
from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import fast, read_jsonl, refused, write_jsonl

pytestmark = pytest.mark.usefixtures("only_installed_orpo")


def run_args(tmp_path, *extra):
    return ["run", "-m", "orpo", f"train.output_dir={tmp_path / 'out'}", "train.max_steps=1",
            "data.max_train_samples=8",
            "data.max_eval_samples=4", "train.save_steps=null", "train.plots=false", "train.disable_tqdm=true", *extra]


PAIR = {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}


@pytest.mark.parametrize("extra, message", [
    (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0 (got -1)"),
    (["train.seed=4294967296"], "train.seed: Input should be less than 4294967296"),
    (["train.num_train_epochs=.inf"], "train.num_train_epochs: Input should be a finite number (got inf)"),
    (["train.learning_rate=.inf"], "train.learning_rate: Input should be a finite number (got inf)"),
    (["train.lr_scheduler_type=cosine_with_min_lr"],
     "do not fit schedule cosine_with_min_lr: One of min_lr or min_lr_rate"),
    (["train.lr_scheduler_type=reduce_lr_on_plateau"], "reduce_lr_on_plateau steps on an eval metric"),
    (["train.lr_scheduler_kwargs={foo: 1}"], "unexpected keyword argument 'foo'"),
    (["train.report_to=[a,"], "argument train.report_to: value '[a,' cannot be parsed"),
    (["model.init_kwargs={low_cpu_mem_usage: true}"],
     "model.init_kwargs: the built-in model builtin:tiny is built, not loaded"),
    (["model.name_or_path=some/model", "model.init_kwargs={dtype: float16}"],
     "model.init_kwargs: dtype is set by model.dtype"),
    (["train.fp16=true", "train.use_cpu=true"], "train.fp16: float16 mixed precision needs a GPU"),
    (["model.ref_name_or_path=builtin:tiny"], "model.ref_name_or_path: method orpo uses no reference model"),
    (["model.dtype=float16"], "model.dtype: model.embed_tokens.weight and 19 other trained weights are float16, which "
                              "train.optim=adamw_torch_fused cannot update"),
    (["model.attn_implementation=nonsense"],
     "model.attn_implementation=nonsense: Specified `attn_implementation=\"nonsense\"`"),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation=flash_attention_2 needs a CUDA GPU"),
    (["method.padding_value=5000"],
     "method.padding_value is 5000: token id 5000 in input_ids is outside the model's vocabulary"),
    (["data.train=someone/no-such-dataset"],
     "someone/no-such-dataset: no such local file or folder, and it cannot be loaded"),
])
def test_config_mistakes(tmp_path, extra, message):
    assert message in refused(*run_args(tmp_path, *extra), written=tmp_path / "out")


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n',
     "bad.jsonl:1: not UTF-8 text (byte 0xff at column 13)"),
    ("bad.csv", b"prompt,chosen,rejected\np,c,r\n\xfe,c,r\n", "bad.csv:3: not UTF-8 text (byte 0xfe at column 1)"),
    ("bad.parquet", b"garbage, not parquet\n",
     "bad.parquet: cannot be read as parquet: ArrowInvalid: Parquet magic bytes"),
])
def test_unreadable_data_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert message in refused(*run_args(tmp_path, f"data.train={tmp_path / name}"), written=tmp_path / "out")


@pytest.mark.parametrize("text, message", [
    ("train:\n\tmax_steps: 1\n", "c.yaml:2:1: not valid YAML: a tab character; YAML indents with spaces"),
    ("train:\n  max_steps: 1\n  max_steps: 2\n",
     "c.yaml:3:3: not valid YAML: duplicate key max_steps (the mapping starts at line 2)"),
    ("train: {max_steps: 1\n", "c.yaml:2:1: not valid YAML: did not find expected ',' or '}'"),
    ("just a string\n",
     "c.yaml: must hold a mapping of sections (model, data, train, generation, rewards, method), not a str"),
])
def test_yaml_mistakes(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    assert message in refused(*run_args(tmp_path, "-c", tmp_path / "c.yaml"), written=tmp_path / "out")


def test_config_given_a_folder(tmp_path):
    assert f"config file {tmp_path} is a folder; give a YAML file" in refused("run", "-m", "orpo", "-c", tmp_path)


def test_output_dir_that_cannot_be_written_is_refused_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file; give a folder" in refused(*run_args(tmp_path, f"train.output_dir={tmp_path / 'file'}"))
    assert "lies under a file" in refused(*run_args(tmp_path, f"train.output_dir={tmp_path / 'file' / 'run'}"))
    # /sys is read-only even for root (the tests may run as root, where permission bits do not stop writes)
    assert "/sys/alignkit-run (its nearest existing parent /sys) is not writable" in refused(
        *run_args(tmp_path, "train.output_dir=/sys/alignkit-run"))


def test_a_model_smaller_than_its_tokenizer_and_nan_weights_are_named(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignkit.engine.modeling import tiny_llama_config

    small = tmp_path / "small"
    AutoModelForCausalLM.from_config(tiny_llama_config(300)).save_pretrained(small)
    tiny_tokenizer().save_pretrained(small)
    assert "has 300 token embeddings but its tokenizer has 384 tokens" in refused(
        *run_args(tmp_path, f"model.name_or_path={small}"), written=tmp_path / "out")
    assert "the model has 300 token embeddings but its tokenizer has 384 tokens" in refused(
        "generate", "--model", small, "sort: 2 1 =")
    nan = tmp_path / "nan"
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    model.save_pretrained(nan)
    tiny_tokenizer().save_pretrained(nan)
    line = refused(*run_args(tmp_path, f"model.name_or_path={nan}"), written=tmp_path / "out")
    assert "parameter model.layers.1.mlp.up_proj.weight holds NaN/inf values; the input model is damaged" in line


def test_plot_to_an_unwritable_place(tmp_path):
    (tmp_path / "run").mkdir()
    write_jsonl(tmp_path / "run" / "metrics.jsonl", [{"step": 1, "epoch": 0.1, "loss": 1.0}])
    assert "/sys/alignkit-plots" in refused("plot", tmp_path / "run", "-o", "/sys/alignkit-plots")


def test_truncation_without_drops_says_nothing_was_dropped(pm, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    alignkit.run("orpo", {**fast(tmp_path, max_steps=1), "method": {"max_length": 16, "max_prompt_length": 8}},
                 plugins=pm)
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warned and all("dropped" not in m and "nothing left" not in m for m in warned), warned


def test_an_infinite_update_is_stopped_before_it_is_accepted(pm, tmp_path):
    cfg, method = alignkit.load_config("orpo", fast(tmp_path, max_steps=3), plugins=pm)
    model = tiny_model()
    engine = Engine(cfg, method, pm, model=model, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=float("inf")))
    with pytest.raises(alignkit.AlignkitError,
                       match=r"^step 1: the update made .* NaN/inf although the loss \(.*\) and "
                                                     r"gradient norm \(.*\) were finite"):
        engine.train()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_evaluation_never_writes_into_another_run(pm, tmp_path):
    run = alignkit.run("orpo", fast(tmp_path / "a", max_steps=1), plugins=pm).output_dir
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(alignkit.ConfigError, match="holds a training run; evaluation writes eval_results.json only"):
        alignkit.evaluate("orpo", plugins=pm, **{"data.max_eval_samples": 4, "train.output_dir": str(run)})
    assert sorted(p.name for p in run.iterdir()) == before
    # by default the results go beside the evaluated model (here: that run's own folder)
    alignkit.evaluate("orpo", plugins=pm, **{"data.max_eval_samples": 4, "model.name_or_path": str(run)})
    assert "eval_loss" in json.loads((run / "eval_results.json").read_text())


def test_secrets_from_the_environment_are_recorded_as_the_interpolation(pm, tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2-secret")
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "out"))
    result = alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm,
                          **{"train.run_name": "${oc.env:SECRET_TOKEN}", "train.output_dir": "${oc.env:RUN_DIR}"})
    assert result.config.train.run_name == "hunter2-secret" and result.output_dir == tmp_path / "out"
    for name in ("config.yaml", "README.md"):
        text = (tmp_path / "out" / name).read_text()
        assert "hunter2" not in text and '"${oc.env:SECRET_TOKEN}"' in text, name
    from alignkit.config import recorded

    assert recorded(result.config).train.run_name == "${oc.env:SECRET_TOKEN}"  # what the trackers are given


def test_a_secret_inside_a_dict_setting_is_recorded_as_the_interpolation(pm, tmp_path, monkeypatch):
    """An HF token given to from_pretrained through model.init_kwargs: it reaches the loader, and no written file
    (config.yaml, the model card, a checkpoint's config) holds it."""
    monkeypatch.setenv("HF_SECRET", "hf_hunter2")
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    result = alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm,
                          **{"model.name_or_path": str(model_dir), "model.init_kwargs.token": "${oc.env:HF_SECRET}"})
    assert result.config.model.init_kwargs["token"] == "hf_hunter2"
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()
               and p.suffix in (".yaml", ".md", ".json", ".jsonl")]
    assert any("${oc.env:HF_SECRET}" in p.read_text() for p in written)
    assert not [p for p in written if "hunter2" in p.read_text()]


def test_lora_on_the_builtin_model_records_its_base_and_generates_offline(pm, tmp_path):
    out = alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm, **{"model.peft.r": 4}).output_dir
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny"
    result = CliRunner().invoke(cli, ["generate", "--model", str(out), "--temperature", "0", "--max-new-tokens", "4",
                                      "sort: 2 1 ="])
    assert result.exit_code == 0, result.output
    # the adapter on the base rebuilt from the run's seed is the trained model: the same final eval loss
    from alignkit.cli.generate import load

    model, tok = load(str(out))
    final = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r][-1]["eval_loss"]
    again = alignkit.evaluate("orpo", plugins=pm, model=model, tokenizer=tok,
                              **{"data.max_eval_samples": 8, "train.per_device_eval_batch_size": 4,
                                 "train.output_dir": str(tmp_path / "eval")})
    assert again["eval_loss"] == pytest.approx(final, rel=1e-5)


def test_an_adapter_whose_base_holds_only_a_pickle_is_refused(pm, tmp_path):
    base = tmp_path / "base"
    model = tiny_model()
    model.save_pretrained(base)
    (base / "model.safetensors").unlink()
    torch.save(model.state_dict(), base / "pytorch_model.bin")  # a base as older tools saved it: a pickle only
    tiny_tokenizer().save_pretrained(base)
    assert (base / "pytorch_model.bin").is_file() and not (base / "model.safetensors").exists()
    out = alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm,
                       **{"model.peft.r": 4, "model.name_or_path": str(base),
                          "model.init_kwargs": {"use_safetensors": False}}).output_dir
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    line = refused("generate", "--model", out, "hello")
    assert f"--model {out}: its base model: cannot load the model from {base}" in line
