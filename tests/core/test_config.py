"""Config layers, overrides and every kind of config error."""

from pathlib import Path

import pytest
import yaml

import alignkit_orpo
from alignkit import ConfigError, get_plugin_manager, load_config
from alignkit.config import to_yaml
from helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_method_defaults_apply_unless_user_sets_them(pm):
    cfg, _ = load_config("orpo", {"data": {"train": "pairs.jsonl"}}, plugins=pm)
    assert cfg.train.learning_rate == 1e-6  # ORPO's default, not the core's 5e-5
    assert cfg.train.output_dir == "outputs/orpo"
    cfg, _ = load_config("orpo", {"data": {"train": "pairs.jsonl"}}, {"train.learning_rate": 2e-5}, plugins=pm)
    assert cfg.train.learning_rate == 2e-5


def test_demo_preset_only_with_builtin_model_and_data(pm):
    demo, _ = load_config("orpo", plugins=pm)
    assert demo.train.learning_rate == alignkit_orpo.DEMO_DEFAULTS["train.learning_rate"]
    assert (demo.data.train, demo.data.eval) == ("builtin:sort", "builtin:sort")  # ORPO's demo_data
    real, _ = load_config("orpo", {"model": {"name_or_path": "Qwen/Qwen2-0.5B"}}, plugins=pm)
    assert real.train.learning_rate == 1e-6
    assert (real.data.eval, real.data.eval_split) == ("builtin:sort", "test")  # built-in data keeps its held-out split
    chat, _ = load_config("orpo", {"data": {"train": "builtin:sort-chat"}}, plugins=pm)
    assert chat.data.eval == "builtin:sort-chat"
    held_out, _ = load_config("orpo", {"data": {"eval_fraction": 0.1}}, plugins=pm)
    assert held_out.data.eval is None
    own, _ = load_config("orpo", {"data": {"train": "pairs.jsonl"}}, plugins=pm)
    assert own.data.eval is None and own.train.learning_rate == 1e-6


def test_yaml_file_then_overrides_then_interpolation(pm, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n  output_dir: runs/x\nmethod:\n  name: orpo\n  beta: 0.3\n")
    cfg, method = load_config(None, path, ["method.beta=0.5", "train.run_name=x-${train.max_steps}"], plugins=pm)
    assert method.name == "orpo"
    assert (cfg.train.max_steps, cfg.method.beta, cfg.train.run_name) == (7, 0.5, "x-7")
    cfg, _ = load_config("orpo", None, {"train": {"seed": 3}, "method.max_length": 64,
                                           "method.max_prompt_length": 32}, plugins=pm)
    assert cfg.train.seed == 3 and cfg.method.max_length == 64


@pytest.mark.parametrize("overrides, message", [
    ({"train.learnig_rate": 1e-4}, "unknown key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
    ({"method.bta": 0.2}, "unknown key 'method.bta' (did you mean 'beta'?)"),
    ({"trian.seed": 1}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"train.learning_rate": -1.0}, "train.learning_rate: Input should be greater than 0 (got -1.0)"),
    ({"train.learning_rate": 0}, "train.learning_rate: Input should be greater than 0"),
    ({"train.max_steps": "ten"}, "train.max_steps: Input should be a valid integer"),
    ({"method.truncation_mode": "keep_middle"}, "method.truncation_mode: Input should be 'keep_end' or 'keep_start'"),
    ({"method.max_prompt_length": 1024},
     "method.max_prompt_length (1024) must be smaller than method.max_length (1024)"),
    ({"train.lr_scheduler_type": "cosin"}, "unknown schedule 'cosin' (did you mean 'cosine'?)"),
    ({"train.report_to": "tensorbord"}, "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
    ({"train.bf16": True, "train.fp16": True}, "set train.bf16 or train.fp16, not both"),
    ({"train.run_name": "${nope}"}, "config: Interpolation key 'nope' not found"),
])
def test_errors_name_the_key_and_value(pm, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("orpo", None, overrides, plugins=pm)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_method_flag_and_config_must_agree(pm):
    with pytest.raises(ConfigError, match="--method orpo disagrees with method.name: dpo"):
        load_config("orpo", {"method": {"name": "dpo"}}, plugins=pm)
    with pytest.raises(ConfigError, match="no method given.*registered: orpo"):
        load_config(None, {}, plugins=pm)


def test_file_errors(pm, tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml does not exist"):
        load_config("orpo", tmp_path / "missing.yaml", plugins=pm)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: not valid YAML: did not find expected ',' or ']'"):
        load_config("orpo", bad, plugins=pm)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config("orpo", scalar, plugins=pm)


def test_yaml_is_data_only(pm, tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train:\n  run_name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_config("orpo", path, plugins=pm)
    assert not Path("pwned").exists()


def test_printed_default_config_round_trips(pm, tmp_path):
    cfg, _ = load_config("orpo", None, {"method.beta": 0.25, "train.learning_rate": 1e-6}, plugins=pm)
    text = to_yaml(cfg)
    assert "# Weight of the odds-ratio term" in text
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    again, _ = load_config(None, path, plugins=pm)
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_LOAD_PLUGINS", raising=False)
    pm = get_plugin_manager()  # installed plugins, as the CLI sees them (CI installs plugins/*)
    first_line = path.read_text().splitlines()[0]
    assert (first_line.startswith("# ") and "alignkit run" in first_line
            and str(path.relative_to(path.parents[1])) in first_line)
    raw = yaml.safe_load(path.read_text())
    cfg, _ = load_config(None, path, plugins=pm)
    assert cfg.method.name == raw["method"]["name"]
    for section in ("model", "data", "train"):
        for key, value in raw.get(section, {}).items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 3
