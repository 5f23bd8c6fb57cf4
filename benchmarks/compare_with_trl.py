"""alignkit's ORPO eval metrics against TRL's ORPOTrainer.evaluate() on the same model and data.

TRL v0.15.2 needs transformers 4.x, so it runs in its own environment:
    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install torch==2.13.0 trl==0.15.2 transformers==4.49.0 \\
        "accelerate<1.5" "datasets<4"
    python benchmarks/compare_with_trl.py --trl-python /tmp/trl/bin/python
Writes benchmarks/trl-parity.md. Both sides run in float32 on the CPU.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {  # name -> (data file, ORPO settings); cases named t5-* use the encoder-decoder model
    "standard-explicit": ("standard.jsonl", {"max_length": 1024, "max_prompt_length": 512}),
    "t5-encoder-decoder": ("standard.jsonl", {"max_prompt_length": 12, "max_completion_length": 8}),
    "standard-truncated-keep_end": ("standard.jsonl", {"max_length": 14, "max_prompt_length": 8}),
    "standard-truncated-keep_start": ("standard.jsonl",
                                      {"max_length": 14, "max_prompt_length": 8, "truncation_mode": "keep_start"}),
    "standard-implicit": ("implicit.jsonl", {"max_length": 1024, "max_prompt_length": 512}),
    "conversational": ("chat.jsonl", {"max_length": 1024, "max_prompt_length": 512}),
    # alignkit's CPO and SimPO plugins against TRL's CPOTrainer (needs: pip install -e plugins/alignkit-cpo ...)
    "cpo-sigmoid": ("standard.jsonl", {"max_length": 14, "max_prompt_length": 8, "beta": 0.3, "cpo_alpha": 0.7}),
    "simpo": ("chat.jsonl", {"max_length": 1024, "max_prompt_length": 512, "beta": 2.0, "simpo_gamma": 0.5,
                             "cpo_alpha": 0.0}),
}
METHODS = {"cpo-sigmoid": ("cpo", "sigmoid"), "simpo": ("simpo", "simpo")}  # case -> (alignkit method, TRL loss_type)
BATCH, BETA = 4, 0.1


def make_inputs(work: Path) -> None:
    """Save a tiny random Llama with the built-in tokenizer, and three small datasets."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from alignkit.blocks.demo import sort_pairs
    from alignkit.testing import tiny_model, tiny_tokenizer

    tiny_model(seed=11).save_pretrained(work / "model")
    tiny_tokenizer().save_pretrained(work / "model")
    torch.manual_seed(11)
    T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                        decoder_start_token_id=0, pad_token_id=0,
                                        eos_token_id=2)).save_pretrained(work / "t5")
    tiny_tokenizer().save_pretrained(work / "t5")
    rows = sort_pairs(24, seed=5)
    rows[0]["prompt"] = "sort: " + " ".join(["7"] * 12) + " ="  # a prompt that overflows max_length 14
    rows[1]["chosen"] = " " + " ".join(["1"] * 12)  # an answer that overflows
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    for name, data in (("standard.jsonl", rows), ("chat.jsonl", chat), ("implicit.jsonl", implicit)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in data))


def alignkit_side(work: Path) -> dict:
    import alignkit

    out = {}
    for case, (data, settings) in CASES.items():
        model_dir = work / ("t5" if case.startswith("t5") else "model")
        overrides = {"model.name_or_path": str(model_dir), "data.train": str(work / data),
                     "train.per_device_eval_batch_size": BATCH, "train.output_dir": str(work / "ak" / case)}
        settings.setdefault("beta", BETA)
        overrides.update({f"method.{k}": v for k, v in settings.items()})
        out[case] = alignkit.evaluate(METHODS.get(case, ("orpo",))[0], **overrides)
    return out


def trl_side(work: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast
    from trl import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer

    out = {}
    for case, (data, settings) in CASES.items():
        seq2seq = case.startswith("t5")
        model = (AutoModelForSeq2SeqLM if seq2seq
                 else AutoModelForCausalLM).from_pretrained(work / ("t5" if seq2seq else "model"))
        # transformers 5 saves tokenizer_class "TokenizersBackend", unknown to 4.x: same tokenizer.json, same ids.
        tok = PreTrainedTokenizerFast(tokenizer_file=str(work / "model" / "tokenizer.json"), bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>")
        tok.chat_template = (work / "model" / "chat_template.jinja").read_text()
        ds = load_dataset("json", data_files=str(work / data), split="train")
        common = dict(output_dir=str(work / "trl" / case), per_device_eval_batch_size=BATCH, report_to=[], use_cpu=True)
        if case in METHODS:
            args = CPOConfig(loss_type=METHODS[case][1], **common, **settings)
            trainer = CPOTrainer(model=model, args=args, processing_class=tok, train_dataset=ds, eval_dataset=ds)
        else:
            args = ORPOConfig(**common, **{"beta": BETA, **settings})
            trainer = ORPOTrainer(model=model, args=args, processing_class=tok, train_dataset=ds, eval_dataset=ds)
        metrics = trainer.evaluate()
        out[case] = {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in
                     ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                                                                    "eval_model_preparation_time")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trl-python", required=False)
    parser.add_argument("--side", choices=["alignkit", "trl"])
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.side:
        side = alignkit_side if args.side == "alignkit" else trl_side
        print(json.dumps(side(Path(args.work))))
        return
    work = Path(tempfile.mkdtemp(prefix="orpo-parity-"))
    make_inputs(work)
    runs = {}
    for side, python in (("alignkit", sys.executable), ("trl", args.trl_python)):
        proc = subprocess.run([python, __file__, "--side", side, "--work", str(work)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{side} side failed:\n{proc.stderr[-4000:]}")
        runs[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = ["| case | metric | alignkit | TRL 0.15.2 | relative difference |", "|---|---|---:|---:|---:|"]
    worst = 0.0
    for case in CASES:
        ours, theirs = runs["alignkit"][case], runs["trl"][case]
        assert set(ours) == set(theirs), (case, set(ours) ^ set(theirs))
        for key in sorted(ours):
            rel = abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-12)
            worst = max(worst, rel)
            lines.append(f"| {case} | {key} | {ours[key]:.9g} | {theirs[key]:.9g} | {rel:.1e} |")
    versions = {side: subprocess.run([py, "-c", "import torch, transformers; print(torch.__version__, "
                                      "transformers.__version__)"],
                                     capture_output=True, text=True).stdout.split()
                for side, py in (("alignkit", sys.executable), ("trl", args.trl_python))}
    header = [
        "# ORPO eval metrics: alignkit vs TRL v0.15.2 ORPOTrainer.evaluate()", "",
        "Command: `python benchmarks/compare_with_trl.py --trl-python PATH/TO/trl-venv/bin/python`  ",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU; float32.  ",
        f"alignkit side: torch {versions['alignkit'][0]}, transformers {versions['alignkit'][1]}; "
        f"TRL side: torch {versions['trl'][0]}, transformers {versions['trl'][1]}, trl 0.15.2.  ",
        f"Models: a tiny random Llama (alignkit.testing.tiny_model(seed=11)) and, for t5-*, a tiny random T5, with the "
        f"built-in tokenizer; 24 pairs of "
        f"builtin sort data per case; eval batch {BATCH}; beta {BETA}.", "",
        f"**Largest relative difference: {worst:.1e}** (target 1e-5). The largest ones are log_odds_chosen and "
        "rewards/margins, differences of near-equal float32 numbers. cpo-sigmoid and simpo are the alignkit-cpo and "
        "alignkit-simpo plugins against TRL's CPOTrainer (loss_type sigmoid / simpo). SimPO's nll_loss is 0 on "
        "both sides because cpo_alpha is 0.", "",
    ]
    out = Path(__file__).with_name("trl-parity.md")
    out.write_text("\n".join(header + lines) + "\n")
    print(f"largest relative difference: {worst:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
