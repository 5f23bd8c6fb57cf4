"""alignkit's SFT eval metrics against TRL 1.x SFTTrainer.evaluate() on the same model and data.

Both run here, offline, in float32 on the CPU (trl comes with the bench extra):
    pip install -e ".[bench]" -e plugins/alignkit-sft
    python benchmarks/compare_sft_with_trl.py
Writes benchmarks/sft-parity.md. One eval batch holds the whole eval set: there TRL's mean of per-batch
means and alignkit's exact mean over all tokens are the same number.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

CASES = {  # name -> (data file, SFT settings, the same for TRL's SFTConfig)
    "standard-prompt-completion": ("standard.jsonl", {}),
    "standard-prompt-completion-full-loss": ("standard.jsonl", {"completion_only_loss": False}),
    "conversational-prompt-completion": ("chat.jsonl", {}),
    "conversational-prompt-completion-full-loss": ("chat.jsonl", {"completion_only_loss": False}),
    "standard-language-modeling": ("text.jsonl", {}),
    "conversational-language-modeling": ("messages.jsonl", {}),
    "conversational-language-modeling-assistant-only": ("messages.jsonl", {"assistant_only_loss": True}),
    "conversational-prompt-completion-assistant-only": ("chat.jsonl", {"assistant_only_loss": True,
                                                                       "completion_only_loss": False}),
    "standard-truncated": ("standard.jsonl", {"max_length": 12}),
}
ROWS = 24
SMALL_BATCH = 5
METRICS = ("eval_loss", "eval_mean_token_accuracy", "eval_entropy", "eval_num_tokens")


def make_inputs(work: Path, rows: int = ROWS) -> None:
    """Save a tiny random Llama with the built-in tokenizer, and the datasets of every case."""
    from alignkit.blocks.demo import digit_lists, prompt, words
    from alignkit.testing import tiny_model, tiny_tokenizer

    tiny_model(seed=11).save_pretrained(work / "model")
    tiny_tokenizer().save_pretrained(work / "model")
    pc = [{"prompt": prompt(d), "completion": " " + words(sorted(d))} for d in digit_lists(rows, seed=5)]
    pc[0]["prompt"] = "sort: " + " ".join(["7"] * 12) + " ="  # a row that overflows max_length 12
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in pc]
    text = [{"text": r["prompt"] + r["completion"]} for r in pc]
    messages = [{"messages": r["prompt"] + r["completion"]} for r in chat]
    for name, data in (("standard.jsonl", pc), ("chat.jsonl", chat), ("text.jsonl", text),
                       ("messages.jsonl", messages)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in data))


def alignkit_side(work: Path, cases: dict, batch: int) -> dict:
    import alignkit

    out = {}
    for case, (data, settings) in cases.items():
        overrides = {"model.name_or_path": str(work / "model"), "data.train": str(work / data),
                     "train.per_device_eval_batch_size": batch, "train.output_dir": str(work / "ak" / case),
                     **{f"method.{k}": v for k, v in settings.items()}}
        metrics = alignkit.evaluate("sft", **overrides)
        out[case] = {k: metrics[k] for k in METRICS}
    return out


def trl_side(work: Path, cases: dict, batch: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = {}
    for case, (data, settings) in cases.items():
        model = AutoModelForCausalLM.from_pretrained(work / "model")
        tok = AutoTokenizer.from_pretrained(work / "model")
        ds = load_dataset("json", data_files=str(work / data), split="train")
        args = SFTConfig(output_dir=str(work / "trl" / case), per_device_eval_batch_size=batch, report_to=[],
                         use_cpu=True, bf16=False, **settings)
        metrics = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=ds, eval_dataset=ds).evaluate()
        out[case] = {k: metrics[k] for k in METRICS}
    return out


def compare(ours: dict, theirs: dict) -> tuple[float, list[str]]:
    """Largest relative difference, and the table rows."""
    worst, lines = 0.0, []
    for case in ours:
        for key in METRICS:
            a, b = ours[case][key], theirs[case][key]
            rel = 0.0 if a == b else abs(a - b) / max(abs(b), 1e-12)
            worst = max(worst, rel)
            lines.append(f"| {case} | {key} | {a:.9g} | {b:.9g} | {rel:.1e} |")
    return worst, lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=ROWS, help="rows per dataset (all in one eval batch)")
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing sft-parity.md")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    work = Path(tempfile.mkdtemp(prefix="sft-parity-"))
    make_inputs(work, args.rows)
    ours, theirs = alignkit_side(work, CASES, args.rows), trl_side(work, CASES, args.rows)
    worst, rows = compare(ours, theirs)
    # The same model and data in eval batches of 5 (24 rows: 4 batches of 5 and one of 4): only TRL's numbers move.
    small = {"standard-prompt-completion": CASES["standard-prompt-completion"]}
    ours_small, theirs_small = alignkit_side(work, small, SMALL_BATCH), trl_side(work, small, SMALL_BATCH)
    small_rows = [f"| {key} | {ours_small[case][key]:.9g} | {ours[case][key]:.9g} | {theirs_small[case][key]:.9g} | "
                  f"{theirs[case][key]:.9g} |" for case in small for key in METRICS[:3]]
    lines = ["| case | metric | alignkit | TRL | relative difference |", "|---|---|---:|---:|---:|", *rows]
    header = [
        f"# SFT eval metrics: alignkit vs TRL {trl.__version__} SFTTrainer.evaluate()", "",
        "Command: `python benchmarks/compare_sft_with_trl.py` (after `pip install -e \".[bench]\" -e "
        "plugins/alignkit-sft`)  ",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, no GPU; float32; torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}.  ",
        f"Model: a tiny random Llama (alignkit.testing.tiny_model(seed=11)) with the built-in tokenizer; {args.rows} "
        "rows "
        f"of sort data per case (prompt-completion, or joined as text / messages), one eval batch of {args.rows}.", "",
        f"**Largest relative difference: {worst:.1e}** (target 1e-5).", "",
        "eval_num_tokens is what TRL logs under that name: the number of input tokens seen in training so far (0 "
        "before any training), not a count of the eval set.", "",
        "## Smaller eval batches", "",
        "TRL's eval_loss, eval_mean_token_accuracy and eval_entropy are means of per-batch means (each batch's "
        "token mean, then averaged over batches weighted by rows for the loss, unweighted for the other two). "
        "alignkit sums over every token of the eval set and divides once, so its numbers do not depend on "
        "per_device_eval_batch_size. With one batch holding the whole eval set (as here) the two agree; with "
        "smaller batches TRL's differ from these by how much the batches' token counts differ. Measured on the "
        f"standard-prompt-completion case with eval batches of {SMALL_BATCH}:", "",
        f"| metric | alignkit, batch {SMALL_BATCH} | alignkit, one batch | TRL, batch {SMALL_BATCH} | TRL, one batch |",
        "|---|---:|---:|---:|---:|", *small_rows, "",
        "## One eval batch holding the whole eval set", "",
    ]
    text = "\n".join(header + lines) + "\n"
    if args.no_write:
        print(text)
    else:
        out = Path(__file__).with_name("sft-parity.md")
        out.write_text(text)
        print(f"largest relative difference: {worst:.2e}; wrote {out}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
