"""`alignkit merge --model ADAPTER_DIR --out DIR`: a LoRA adapter merged into its base (peft's merge_and_unload) and
saved as a plain model folder with the tokenizer, which transformers and vLLM load without peft."""

import os
import shutil
import tempfile
from pathlib import Path

import click

from alignkit.errors import ConfigError

#: adapters of models that do not generate text: merged, they would not be causal language models
_NOT_CAUSAL = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "QUESTION_ANS")


@click.command()
@click.option("--model", "model_dir", required=True, help="A LoRA adapter folder (a run with model.peft).")
@click.option("--out", "out", required=True, type=click.Path(), help="New (or empty) folder for the merged model.")
def merge(model_dir, out):
    """Merge a LoRA adapter into its base model (adapter_config.json's base_model_name_or_path; a built-in base is
    rebuilt from the run's train.seed) and save a plain model folder with the tokenizer: loadable with
    AutoModelForCausalLM.from_pretrained, vLLM or `alignkit generate` (no peft needed).

    \b
    alignkit merge --model outputs/my-lora-run --out outputs/my-merged-model
    """
    adapter, out = Path(model_dir), Path(out)
    check(adapter, out)
    from alignkit.cli.generate import _adapter_config, load

    task = _adapter_config(adapter).get("task_type")
    if task in _NOT_CAUSAL:
        raise ConfigError(f"--model {adapter}: a LoRA adapter for {task}; merge makes causal language models "
                          "(a reward model's adapter loads as it is: model.name_or_path=ADAPTER_DIR)")
    model, tokenizer = load(str(adapter))  # the base resolved and checked, the adapter on it, both safetensors
    merged = model.merge_and_unload()
    save(merged, tokenizer, out)
    click.echo(str(out))


def check(adapter: Path, out: Path) -> None:
    """One-line ConfigErrors, before anything is loaded or written: the adapter folder, and an --out that is new or
    an empty folder (never another run's folder, the adapter's own included)."""
    if not adapter.is_dir():
        raise ConfigError(f"--model {adapter}: no such folder (give a LoRA adapter folder, e.g. a run's output_dir "
                          "trained with model.peft)")
    if not (adapter / "adapter_config.json").is_file():
        what = "a full model (nothing to merge)" if (adapter / "config.json").is_file() else "a folder"
        raise ConfigError(f"--model {adapter}: not a LoRA adapter: it is {what} without adapter_config.json; give "
                          "the output_dir of a run with model.peft")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: exists and is not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: folder is not empty (another run's or the user's files); give a new or empty "
                          "folder")


def save(model, tokenizer, out: Path) -> None:
    """Weights (safetensors) and tokenizer written to a temporary folder beside `out`, then moved into place: an
    interrupted merge leaves no half-written model in `out`."""
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.absolute().parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked): an os.replace onto it needs it gone
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
