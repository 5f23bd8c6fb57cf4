"""alignkit's distill loss against TRL 1.16's GKDTrainer (trl.experimental.gkd) on the same models and rows: the eval
loss (GKDTrainer.evaluate()) and one training step's loss and gradients (GKDTrainer.compute_loss + backward), for
the generalized JSD at beta 0 (forward KL), 0.5 and 1 (reverse KL), standard and conversational data.

    pip install -e ".[bench]" -e plugins/alignkit-distill
    python benchmarks/compare_distill_with_trl.py

Writes benchmarks/distill-parity.md. Both sides run in float32 on the CPU, offline. TRL's GKD collator
(DataCollatorForChatML) left-pads and its models then see other position ids than right-padded rows: every row here
has the same length (digit lists of one length), so padding is not what is compared. Standard rows reach TRL as the
alignkit formatter's tokens (`input_ids` and TRL's `completion_mask`, which its collator reads); conversational rows
as `messages`, tokenized by TRL's collator itself. Sampling (lmbda, seq_kd) differs by design and is off (lmbda=0):
the loss and its gradients are compared on fixed rows.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

#: name -> (data, beta)
CASES = {
    "standard-beta0": ("standard", 0.0),
    "standard-beta0.5": ("standard", 0.5),
    "standard-beta1": ("standard", 1.0),
    "conversational-beta0": ("chat", 0.0),
    "conversational-beta0.5": ("chat", 0.5),
    "conversational-beta1": ("chat", 1.0),
}
LISTS, DIGITS = 12, 5  # digit lists of one length: every row has the same number of tokens


def plugins():
    import alignkit_distill

    from alignkit.testing import plugin_manager

    return plugin_manager(alignkit_distill)


def make_inputs(work: Path) -> None:
    """Two tiny random Llamas with the built-in tokenizer (student seed 11, teacher seed 12) and the data files."""
    from alignkit_distill.demo import rows

    from alignkit.testing import tiny_model, tiny_tokenizer

    for name, seed in (("student", 11), ("teacher", 12)):
        tiny_model(seed=seed).save_pretrained(work / name)
        tiny_tokenizer().save_pretrained(work / name)
    data = [r for r in rows("test") if len(r["completion"].split()) == DIGITS][:LISTS]
    chat = [{"prompt": [{"role": "user", "content": r["prompt"].removesuffix(" =")}],
             "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in data]
    messages = [{"messages": r["prompt"] + r["completion"]} for r in chat]
    for name, rows_ in (("standard.jsonl", data), ("chat.jsonl", chat), ("messages.jsonl", messages)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows_))


def overrides(work: Path, case: str, out: str) -> dict:
    data, beta = CASES[case]
    return {"model.name_or_path": str(work / "student"), "model.ref_name_or_path": str(work / "teacher"),
            "data.train": str(work / ("chat.jsonl" if data == "chat" else "standard.jsonl")),
            "train.per_device_eval_batch_size": LISTS, "train.output_dir": str(work / out / case),
            "method.beta": beta, "method.lmbda": 0.0}


def alignkit_side(work: Path) -> dict:
    import alignkit

    return {case: alignkit.evaluate("distill", plugins=plugins(), **overrides(work, case, "ak")) for case in CASES}


def _engine(work: Path, case: str):
    import alignkit
    from alignkit.engine.loop import Engine

    pm = plugins()
    cfg, method = alignkit.load_config("distill", None, overrides(work, case, "akg"), plugins=pm)
    engine = Engine(cfg, method, pm).load()
    return engine, engine.data.formatted(need_train=True)["train"]


def trl_trainer(work: Path, case: str, out: str):
    """GKDTrainer on the case's rows: standard ones as alignkit's tokens, conversational ones as messages."""
    from datasets import Dataset, load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    data, beta = CASES[case]
    if data == "chat":
        ds = load_dataset("json", data_files=str(work / "messages.jsonl"), split="train")
    else:  # the formatter's tokens; TRL's collator reads the prompt/completion boundary from completion_mask
        _, formatted = _engine(work, case)
        ds = Dataset.from_list([{"input_ids": r["input_ids"], "prompt": "",
                                 "completion_mask": [int(x != -100) for x in r["labels"]]} for r in formatted])
    args = GKDConfig(output_dir=str(work / out / case), per_device_eval_batch_size=LISTS,
                     per_device_train_batch_size=LISTS, beta=beta, lmbda=0.0, report_to=[], use_cpu=True,
                     bf16=False)
    return GKDTrainer(model=AutoModelForCausalLM.from_pretrained(work / "student"),
                      teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher"), args=args,
                      processing_class=AutoTokenizer.from_pretrained(work / "student"), train_dataset=ds,
                      eval_dataset=ds)


def trl_side(work: Path) -> dict:
    return {case: {"eval_loss": trl_trainer(work, case, "trl").evaluate()["eval_loss"]} for case in CASES}


def gradients_alignkit(work: Path, case: str) -> tuple[float, dict]:
    """Training-mode loss and student gradients of one step on every row as one batch."""
    engine, ds = _engine(work, case)
    batch = engine.formatter.collate([ds[i] for i in range(len(ds))])
    engine.model.train()
    out = engine.loss(engine.model, batch, ref=engine.reference(engine.model, dict(batch)))
    loss = out.normalized({u: float(c) for u, c in engine.loss.counts(batch).items()})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def gradients_trl(work: Path, case: str) -> tuple[float, dict]:
    trainer = trl_trainer(work, case, "trlg")
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def compare(ours: dict, theirs: dict) -> tuple[list[str], float]:
    lines, worst = [], 0.0
    for case in CASES:
        a, b = ours[case]["eval_loss"], theirs[case]["eval_loss"]
        rel = abs(a - b) / max(abs(b), 1e-12)
        worst = max(worst, rel)
        lines.append(f"| {case} | eval_loss | {a:.9g} | {b:.9g} | {rel:.1e} |")
    return lines, worst


def compare_gradients(work: Path, cases=None) -> tuple[list[str], float]:
    lines, worst = [], 0.0
    for case in cases or CASES:
        (ours, g1), (theirs, g2) = gradients_alignkit(work, case), gradients_trl(work, case)
        assert g1.keys() == g2.keys(), set(g1) ^ set(g2)
        grad = max(float((g1[k] - g2[k]).abs().max() / g2[k].abs().max().clamp(min=1e-30)) for k in g1)
        rel = abs(ours - theirs) / abs(theirs)
        worst = max(worst, rel, grad)
        lines.append(f"| {case} | {ours:.9g} | {theirs:.9g} | {rel:.1e} | {grad:.1e} |")
    return lines, worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", help="folder for the models and data (default: a new temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    import transformers
    import trl

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-parity-"))
    make_inputs(work)
    lines, worst = compare(alignkit_side(work), trl_side(work))
    grad_lines, grad_worst = compare_gradients(work)
    header = [
        "# distill (GKD) loss and gradients: alignkit vs TRL 1.16 GKDTrainer", "",
        "Command: `python benchmarks/compare_distill_with_trl.py` (after `pip install -e \".[bench]\" -e "
        "plugins/alignkit-distill`)  ",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, no GPU; float32; torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__} (`trl.experimental.gkd.GKDTrainer`).  ",
        "Models: tiny random Llamas with the built-in tokenizer: the student (alignkit.testing.tiny_model(seed=11)) "
        "and the teacher (seed 12, `model.ref_name_or_path` / TRL's `teacher_model`). Data: "
        f"{LISTS} digit lists of {DIGITS} digits of the sort-distill demo, standard (alignkit's tokens given to TRL "
        "with its `completion_mask`) and conversational (TRL tokenizes `messages` with its own collator); one batch "
        "holding every row; `lmbda=0` (no sampling: the loss is compared on fixed rows). alignkit runs its chunked "
        "path (the teacher's hidden states projected per chunk of positions).", "",
        f"**Largest relative difference: {max(worst, grad_worst):.1e}** (target 1e-5).", "",
        "| case | metric | alignkit | TRL 1.16 | relative difference |", "|---|---|---:|---:|---:|",
    ]
    lines += [
        "", "## One training step", "",
        "The training-mode loss (`GKDTrainer.compute_loss` on its train dataloader's batch, which holds every row) "
        "and the gradient of every student parameter after `backward()`, against alignkit's loss on the same rows. "
        "Gradient difference: the largest over parameters of max|g_alignkit - g_TRL| / max|g_TRL|.", "",
        "| case | loss (alignkit) | loss (TRL 1.16) | relative difference | gradient difference |",
        "|---|---:|---:|---:|---:|", *grad_lines,
    ]
    worst = max(worst, grad_worst)
    out = Path(__file__).with_name("distill-parity.md")
    out.write_text("\n".join(header + lines) + "\n")
    print(f"largest relative difference (eval loss and gradients): {worst:.2e}; wrote {out}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
