"""examples/orpo.py (TRL v0.15.2's example script with its import pointed at alignkit_orpo), run with the
seed's command and the example's documented LoRA command (--optim rmsprop) on offline tiny stand-ins."""

import subprocess
import sys

import pytest
import torch

from helpers import BENCHMARKS, ROOT

sys.path.insert(0, str(BENCHMARKS))
from trl_standins import build_qwen2, build_zen  # noqa: E402

SCRIPT = ROOT / "examples" / "orpo.py"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return build_qwen2(root / "qwen2"), build_zen(root / "zen")


def run(*flags):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, flags)], capture_output=True, text=True,
                          timeout=600, env=env)


def test_the_seeds_command(standins, tmp_path):
    model, zen = standins
    proc = run("--model_name_or_path", model, "--dataset_name", zen, "--dataset_config", "conversational_preference",
               "--num_train_epochs", "1", "--logging_steps", "25", "--output_dir", tmp_path / "out", "--report_to",
               "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "training_args.bin").is_file()
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # 17 rows / 8 per step: 3 steps, saved at the end
    assert "train_loss" in proc.stdout + proc.stderr  # the closing summary row, printed by transformers' callback


def test_the_peft_command_with_rmsprop(standins, tmp_path):
    model, zen = standins
    proc = run("--dataset_name", zen, "--dataset_config", "conversational_preference", f"--model_name_or_path={model}",
               "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "8e-5",
               "--gradient_accumulation_steps", "1", "--logging_steps", "10", "--eval_steps", "500",
               f"--output_dir={tmp_path / 'lora'}", "--optim", "rmsprop", "--warmup_steps", "1", "--report_to", "none",
               "--bf16", "--logging_first_step", "--no_remove_unused_columns", "--use_peft", "--lora_r=16",
               "--lora_alpha=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    groups = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)["param_groups"]
    assert {"alpha", "centered", "momentum"} <= set(groups[0])  # RMSprop's state, not AdamW's
    assert "betas" not in groups[0]


def test_push_to_hub_offline_is_a_one_line_error(standins, tmp_path):
    model, zen = standins
    proc = run("--model_name_or_path", model, "--dataset_name", zen, "--dataset_config", "standard_preference",
               "--max_steps", "1", "--output_dir", tmp_path / "hub", "--report_to", "none", "--push_to_hub")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("orpo.py: push_to_hub: cannot reach the Hugging Face Hub for hub (")
    assert "Traceback" not in proc.stderr and not (tmp_path / "hub").exists()  # refused before anything is written
