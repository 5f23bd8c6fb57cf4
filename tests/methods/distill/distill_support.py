"""Support for the distill tests (importable as `distill_support`): the plugin made visible to the CLI as an
installed distribution (its entry point, from a dist-info folder on sys.path), teachers saved to folders."""

from pathlib import Path

from alignkit.testing import tiny_model, tiny_tokenizer
from helpers import ROOT

PLUGIN_DIR = ROOT / "plugins" / "alignkit-distill"


def install_entry_point(folder: Path) -> Path:
    """A dist-info folder declaring the `alignkit` entry point distill = alignkit_distill (the source stays where it
    is, on sys.path); put `folder` on sys.path (or PYTHONPATH) to make `alignkit run --method distill` find it."""
    info = folder / "alignkit_distill-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alignkit-distill\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[alignkit]\ndistill = alignkit_distill\n")
    return folder


def save_teacher(folder: Path, seed: int = 5, vocab_size: int | None = None, sharpen: float = 1.0) -> str:
    """A tiny random Llama (the built-in tokenizer's vocabulary unless `vocab_size` is given) saved to `folder`;
    `sharpen` scales its (tied) output embedding, so that its next-token distributions are far from uniform."""
    import torch

    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    if vocab_size is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(model.config.__class__(**{**model.config.to_dict(),
                                                                           "vocab_size": vocab_size}))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)
