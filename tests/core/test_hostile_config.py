"""Hostile configs (issue 20): values from the environment stay out of every written file, and config mistakes are
one line, exit 2, before anything is written."""

import json

import alignkit_grpo
import pytest
import torch

import alignkit
from alignkit.testing import plugin_manager, tiny_model, tiny_tokenizer
from helpers import fast, read_jsonl, refused

SECRET = "s3cr3t-path-xyz"


@pytest.fixture
def grpo_pm():
    return plugin_manager(alignkit_grpo)


def _reward_model(path):
    from transformers import LlamaForSequenceClassification

    from alignkit.engine.modeling import tiny_llama_config

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama_config(len(tok), num_labels=1)).save_pretrained(path)
    tok.save_pretrained(path)


def _written_text(folder) -> dict[str, str]:
    """Every file under `folder` (names included) that is text, by relative path."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            try:
                out[str(p.relative_to(folder))] = p.read_text()
            except UnicodeDecodeError:
                out[str(p.relative_to(folder))] = ""
    return out


def _reward_model_run(tmp_path, monkeypatch, **train) -> dict:
    rm_dir = tmp_path / SECRET
    _reward_model(rm_dir)
    monkeypatch.setenv("RM_DIR", str(rm_dir))
    config = fast(tmp_path, max_steps=2, save_steps=1, **train)
    config["data"] = {"max_train_samples": 8, "max_eval_samples": 2}
    config["method"] = {"reward_funcs": ["model:${oc.env:RM_DIR}"], "num_generations": 2,
                        "max_completion_length": 2}
    return config


def test_an_env_value_inside_a_list_setting_is_recorded_as_its_interpolation(grpo_pm, tmp_path, monkeypatch):
    """method.reward_funcs: ['model:${oc.env:RM_DIR}']: the reward model loads from the environment's path, and no
    written file, file name or metric name holds that path."""
    config = _reward_model_run(tmp_path, monkeypatch)
    result = alignkit.run("grpo", config, plugins=grpo_pm)
    assert result.config.method.reward_funcs == [f"model:{tmp_path / SECRET}"]  # the run used the resolved value
    out = tmp_path / "out"
    # what the CLI prints (kept in job logs) names it as written too
    from click.testing import CliRunner

    from alignkit.cli.commands import cli

    config["train"].update(output_dir=str(tmp_path / "cli"), max_steps=1, plots=False, eval_steps=1)
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit-grpo")
    printed = CliRunner().invoke(cli, ["run", "--method", "grpo", "-c", str(tmp_path / "c.yaml")])
    assert printed.exit_code == 0, printed.output
    assert SECRET not in printed.stdout and SECRET not in printed.stderr
    assert "${oc.env:RM_DIR}" in printed.stdout
    written = _written_text(out)
    assert {"config.yaml", "README.md", "metrics.jsonl", "checkpoints/checkpoint-1/config.yaml"} <= set(written)
    leaks = [name for name, text in written.items() if SECRET in name or SECRET in text]
    assert not leaks
    assert '"model:${oc.env:RM_DIR}"' in written["config.yaml"]
    assert any("${oc.env:RM_DIR}" in key for row in read_jsonl(out / "metrics.jsonl") for key in row)


@pytest.mark.slow
def test_plot_names_of_an_env_value_hold_its_interpolation(grpo_pm, tmp_path, monkeypatch):
    alignkit.run("grpo", _reward_model_run(tmp_path, monkeypatch, plots=True), plugins=grpo_pm)
    plots = [p.name for p in (tmp_path / "out" / "plots").iterdir()]
    assert any("RM_DIR" in name for name in plots) and not [name for name in plots if SECRET in name], plots


def test_checkpoints_keep_no_unsalted_hash_of_an_env_value(pm, tmp_path, monkeypatch):
    """The checkpoint may notice a changed environment value, but not by a plain SHA-256 anyone can look up."""
    import hashlib

    monkeypatch.setenv("RUN_SEED", "7")
    alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm, **{"train.seed": "${oc.env:RUN_SEED}"})
    states = [p.read_text() for p in (tmp_path / "out").rglob("*.json")]
    for digest in (hashlib.sha256(v.encode()).hexdigest() for v in ("7", json.dumps(7), json.dumps("7"))):
        assert not [s for s in states if digest in s]
    # a resume in the same environment passes; a changed value is still refused
    first = str(tmp_path / "out" / "checkpoints" / "checkpoint-1")
    monkeypatch.setenv("RUN_SEED", "8")
    with pytest.raises(alignkit.ConfigError, match=r"other values from the environment .*train.seed"):
        alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm,
                     **{"train.seed": "${oc.env:RUN_SEED}", "train.resume_from_checkpoint": first})
    monkeypatch.setenv("RUN_SEED", "7")
    result = alignkit.run("orpo", fast(tmp_path, max_steps=2, save_steps=1), plugins=pm,
                          **{"train.seed": "${oc.env:RUN_SEED}", "train.resume_from_checkpoint": first})
    assert result.global_step == 2


def test_two_runs_hash_the_same_env_value_differently(pm, tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_SEED", "7")
    for name in ("a", "b"):
        alignkit.run("orpo", fast(tmp_path / name, max_steps=2, save_steps=1), plugins=pm,
                     **{"train.seed": "${oc.env:RUN_SEED}"})
    recorded = [json.loads(p.read_text())["environment"]["train.seed"]
                for p in sorted(tmp_path.glob("*/out/checkpoints/checkpoint-1/alignkit_state.json"))]
    assert len(recorded) == 2 and recorded[0] != recorded[1]


def test_an_env_given_model_path_stays_out_of_the_adapter_config(pm, tmp_path, monkeypatch):
    model_dir = tmp_path / SECRET
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    monkeypatch.setenv("BASE_DIR", str(model_dir))
    out = alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm,
                       **{"model.name_or_path": "${oc.env:BASE_DIR}", "model.peft.r": 4}).output_dir
    leaks = [name for name, text in _written_text(out).items() if SECRET in text]
    assert not leaks
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "${oc.env:BASE_DIR}"
    from alignkit.cli.generate import load

    model, tok = load(str(out))  # the adapter still loads on its base, found through the same environment
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_run_name_from_the_environment_reaches_trackers_resolved(pm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    alignkit.run("orpo", fast(tmp_path, max_steps=1), plugins=pm,
                 **{"train.run_name": "job-${oc.env:SLURM_JOB_ID}", "train.report_to": ["tensorboard"]})
    out = tmp_path / "out"
    names = {p.name for p in out.rglob("*") if p.is_dir()}
    assert "job-4242" in names, names
    assert not [n for n in names if "oc.env" in n]
    assert '"job-${oc.env:SLURM_JOB_ID}"' in (out / "config.yaml").read_text()


@pytest.fixture
def installed_orpo(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", "alignkit")


@pytest.mark.parametrize("name", ["../escaped", "a/b", "a\\b", "..", "."])
def test_a_run_name_that_is_a_path_is_refused(installed_orpo, tmp_path, name):
    out = tmp_path / "out"
    line = refused("run", "--method", "orpo", f"train.output_dir={out}", f"train.run_name={name}", written=out)
    assert "train.run_name" in line and "path" in line


@pytest.mark.parametrize("section", ["model", "data", "train", "method"])
@pytest.mark.parametrize("body", ["\n  - a\n  - b\n", " 3\n", " text\n"])
def test_a_section_that_is_not_a_mapping_is_one_line(installed_orpo, tmp_path, section, body):
    config = tmp_path / "c.yaml"
    config.write_text(f"{section}:{body}")
    out = tmp_path / "out"
    line = refused("run", "--method", "orpo", "-c", config, f"train.output_dir={out}", "train.max_steps=1", written=out)
    assert str(config) in line and f"'{section}'" in line and "mapping" in line


def test_a_section_given_as_a_list_override_is_one_line(installed_orpo, tmp_path):
    line = refused("config", "--method", "orpo", "train=[1,2]")
    assert "'train'" in line and "mapping" in line


@pytest.mark.parametrize("value", ["!!binary aGVsbG8=", "!!python/object:builtins.dict {}", "!!python/name:os.system",
                                   "!foo bar", "!!str plain", "!<tag:yaml.org,2002:int> '3'"])
def test_yaml_tags_are_refused_naming_the_file(installed_orpo, tmp_path, value):
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  run_name: {value}\n")
    out = tmp_path / "out"
    line = refused("config", "--method", "orpo", "-c", config, f"train.output_dir={out}")
    assert f"{config}:2:" in line and "tag" in line


@pytest.mark.parametrize("value", ["!!binary aGVsbG8=", "!!python/name:os.system", "!!str plain"])
def test_yaml_tags_in_an_override_are_refused(installed_orpo, pm, value):
    line = refused("config", "--method", "orpo", f"train.run_name={value}")
    assert "train.run_name" in line and "tag" in line
    with pytest.raises(alignkit.ConfigError, match="override train.run_name: YAML tag"):
        alignkit.load_config("orpo", None, [f"train.run_name={value}"], plugins=pm)


def test_a_key_without_its_section_gets_a_did_you_mean(installed_orpo):
    assert "did you mean 'train.learning_rate'?" in refused("config", "--method", "orpo", "learning_rate=1e-5")
    assert "did you mean 'train.max_steps'?" in refused("config", "--method", "orpo", "data.max_steps=3")
    assert "did you mean 'method.beta'?" in refused("config", "--method", "orpo", "beta=0.2")


def test_a_method_in_the_wrong_case_gets_a_did_you_mean(installed_orpo):
    assert "did you mean 'orpo'?" in refused("config", "--method", "ORPO")


def test_a_changed_env_value_inside_a_list_is_noticed_without_writing_it(pm, monkeypatch):
    from alignkit.config import environment_values, recorded, to_yaml

    monkeypatch.setenv("TARGETS", "q_proj")
    cfg, _ = alignkit.load_config("orpo", {"model": {"peft": {"target_modules": ["${oc.env:TARGETS}", "v_proj"]}}},
                                  plugins=pm)
    assert cfg.model.peft.target_modules == ["q_proj", "v_proj"]
    assert recorded(cfg).model.peft.target_modules == ["${oc.env:TARGETS}", "v_proj"]
    assert '["${oc.env:TARGETS}", "v_proj"]' in to_yaml(cfg)
    saved = environment_values(cfg)
    assert list(saved) == ["model.peft.target_modules.0"] and "q_proj" not in json.dumps(saved)
    same, _ = alignkit.load_config("orpo", {"model": {"peft": {"target_modules": ["${oc.env:TARGETS}", "v_proj"]}}},
                                   plugins=pm)
    assert environment_values(same, saved) == saved
    monkeypatch.setenv("TARGETS", "k_proj")
    other, _ = alignkit.load_config("orpo", {"model": {"peft": {"target_modules": ["${oc.env:TARGETS}", "v_proj"]}}},
                                    plugins=pm)
    assert environment_values(other, saved) != saved
