"""TRL 1.16's own example scripts (trl/scripts/*.py of the installed TRL), copied at run time with only their
`from trl import` / `from trl.rewards import` lines pointed at alignkit_trl, run offline on the built-in model and
data (a --config YAML file: `model_name_or_path: builtin:tiny`, `datasets: [{path: builtin:NAME}]`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trl

SCRIPTS = Path(trl.__file__).parent / "scripts"
IMPORT = re.compile(r"^(\s*)from trl(\.rewards)? import", re.MULTILINE)


def rewritten(name: str, folder: Path) -> Path:
    source = (SCRIPTS / f"{name}.py").read_text()
    script = folder / f"{name}.py"
    script.write_text(IMPORT.sub(r"\1from alignkit_trl\2 import", source))
    assert "from trl" not in script.read_text() and "import trl" not in script.read_text()
    return script


def run_script(name: str, tmp_path: Path, data: str, *flags: str, **settings) -> Path:
    out = tmp_path / "out"
    config = {"model_name_or_path": "builtin:tiny", "output_dir": str(out), "max_steps": 2,
              "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none", "bf16": False, **settings}
    lines = [f"{k}: {v}" for k, v in config.items()] + ["datasets:", f"  - path: {data}"]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(rewritten(name, tmp_path)), "--config", str(tmp_path / "config.yaml"),
                           *flags], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training completed" in proc.stdout + proc.stderr
    assert (out / "model.safetensors").is_file() and (out / "training_args.bin").is_file()
    return out


@pytest.mark.parametrize(("script", "data"), [("sft", "builtin:sort-sft"), ("dpo", "builtin:sort"),
                                              ("kto", "builtin:sort-kto"), ("reward", "builtin:sort-reward")])
def test_trl_script_runs_with_the_import_changed(tmp_path, script, data):
    out = run_script(script, tmp_path, data)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # saved at the end, as Trainer does


@pytest.mark.parametrize("script", ["grpo", "rloo"])
def test_trl_online_script_runs_with_a_dotted_reward_and_trls_format_reward(tmp_path, script):
    run_script(script, tmp_path, "builtin:sort-prompts", "--reward_funcs", "alignkit_grpo.rewards.sort_order",
               "think_format_reward", num_generations=4, max_completion_length=8)
