"""alignkit's SFT and DPO on a vision-language model against TRL 1.16's SFTTrainer and DPOTrainer: eval metrics
(evaluate()) and one training step's loss and gradients, on the same tiny model, processor and rows with images.

Both run here, offline, in float32 on the CPU (trl comes with the bench extra):
    pip install -e ".[bench]" -e plugins/alignkit-sft -e plugins/alignkit-dpo
    python benchmarks/compare_vlm_with_trl.py
Writes benchmarks/vlm-parity.md. The model is builtin:tiny-vlm's architecture (an Idefics3 with a 2-layer vision
tower and a 2-layer Llama, random weights from seed 11) saved with its processor; the rows are pictures of coloured
shapes (alignkit.blocks.shapes) with a question each, as conversational prompt-completion rows (SFT) and preference
rows (DPO). One batch holds every row (eval and the training step); the vision tower trains (TRL trains every
parameter), so its gradients are compared too.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROWS = 8
CASES = {"sft": "sft.jsonl", "dpo": "dpo.jsonl"}
SFT_METRICS = ("eval_loss", "eval_mean_token_accuracy", "eval_entropy")


def make_inputs(work: Path, rows: int = ROWS) -> None:
    """The tiny VLM with its processor in work/model (DPO's reference in work/ref); the pictures as PNG files;
    sft.jsonl and dpo.jsonl naming them by absolute path."""
    from alignkit.blocks.shapes import assistant_turn, questions, user_turn
    from alignkit.testing import tiny_vlm, tiny_vlm_processor

    processor = tiny_vlm_processor()
    for name, seed in (("model", 11), ("ref", 12)):  # DPO's reference: another random model, rewards are not 0
        tiny_vlm(seed=seed, processor=processor).save_pretrained(work / name)
        processor.save_pretrained(work / name)
    (work / "pics").mkdir()
    sft, dpo = [], []
    for i, r in enumerate(questions("test")[:rows]):
        path = work / "pics" / f"{i}.png"
        r["image"].save(path)
        sft.append({"images": [str(path)], "prompt": user_turn(r["question"]),
                    "completion": assistant_turn(r["answer"])})
        dpo.append({"images": [str(path)], "prompt": user_turn(r["question"]), "chosen": assistant_turn(r["answer"]),
                    "rejected": assistant_turn(r["wrong"])})
    for name, data in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in data))


def _overrides(work: Path, case: str, folder: str, rows: int) -> dict:
    return {"model.name_or_path": str(work / "model"), "model.freeze_vision_tower": False,
            "data.train": str(work / CASES[case]), "train.per_device_eval_batch_size": rows,
            "train.output_dir": str(work / folder / case),
            **({"model.ref_name_or_path": str(work / "ref")} if case == "dpo" else {})}


def _metrics(metrics: dict) -> dict:
    skip = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time",
            "eval_num_tokens")
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in skip}


def alignkit_eval(work: Path, case: str, rows: int) -> dict:
    import alignkit

    return _metrics(alignkit.evaluate(case, **_overrides(work, case, "ak", rows)))


def trainer(work: Path, case: str, folder: str, rows: int):
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ds = datasets.load_dataset("json", data_files=str(work / CASES[case]), split="train")
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    common = dict(output_dir=str(work / folder / case), per_device_eval_batch_size=rows,
                  per_device_train_batch_size=rows, report_to=[], use_cpu=True, bf16=False,
                  remove_unused_columns=False)
    model = AutoModelForImageTextToText.from_pretrained(work / "model")
    processor = AutoProcessor.from_pretrained(work / "model")
    if case == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=model, args=SFTConfig(**common), processing_class=processor, train_dataset=ds,
                          eval_dataset=ds)
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, ref_model=AutoModelForImageTextToText.from_pretrained(work / "ref"),
                      args=DPOConfig(**common), processing_class=processor, train_dataset=ds, eval_dataset=ds)


def trl_eval(work: Path, case: str, rows: int) -> dict:
    return _metrics(trainer(work, case, "trl", rows).evaluate())


def gradients_alignkit(work: Path, case: str, rows: int) -> tuple[float, dict]:
    """Training-mode loss and gradients of one step on every row as one batch."""
    import alignkit
    from alignkit.engine.loop import Engine

    cfg, method = alignkit.load_config(case, None, _overrides(work, case, "akg", rows))
    engine = Engine(cfg, method, alignkit.get_plugin_manager()).load()
    ds = engine.data.formatted(need_train=True)["train"]
    batch = engine.formatter.collate([ds[i] for i in range(len(ds))])
    engine.model.train()
    if case == "sft":
        out = engine.loss(engine.model, batch)
    else:
        out = engine.loss(engine.model, batch, ref=engine.reference(engine.model, dict(batch)))
    loss = out.normalized({u: float(c) for u, c in engine.loss.counts(batch).items()})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def gradients_trl(work: Path, case: str, rows: int) -> tuple[float, dict]:
    t = trainer(work, case, "trlg", rows)
    batch = next(iter(t.get_train_dataloader()))
    t.model.train()
    loss = t.compute_loss(t.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def gradient_difference(ours: dict, theirs: dict) -> float:
    """The largest difference of any parameter's gradient relative to its largest TRL gradient; a parameter whose
    gradients all stay below 1e-6 of the model's largest is measured against that largest: the attention key biases'
    true gradient is 0 (softmax is unchanged when every key moves alike), both sides hold rounding noise of about
    1e-12 there."""
    top = max(float(g.abs().max()) for g in theirs.values())

    def scale(g) -> float:
        largest = float(g.abs().max())
        return largest if largest >= 1e-6 * top else top
    return max(float((ours[k] - theirs[k]).abs().max()) / scale(theirs[k]) for k in ours)


def compare_case(work: Path, case: str, rows: int) -> tuple[float, list[str], list[str]]:
    """(largest relative difference, metric table rows, gradient table row) of one case."""
    ours, theirs = alignkit_eval(work, case, rows), trl_eval(work, case, rows)
    worst, lines = 0.0, []
    for key in sorted(theirs):
        if key not in ours:
            lines.append(f"| {case} | {key} | (not computed) | {theirs[key]:.9g} | |")
            continue
        a, b = ours[key], theirs[key]
        rel = 0.0 if a == b else abs(a - b) / max(abs(b), 1e-12)
        worst = max(worst, rel)
        lines.append(f"| {case} | {key} | {a:.9g} | {b:.9g} | {rel:.1e} |")
    print("\n".join(lines), flush=True)
    (l1, g1), (l2, g2) = gradients_alignkit(work, case, rows), gradients_trl(work, case, rows)
    if set(g1) != set(g2):
        raise SystemExit(f"{case}: different parameters got gradients: {sorted(set(g1) ^ set(g2))[:5]}")
    grad = gradient_difference(g1, g2)
    rel = abs(l1 - l2) / max(abs(l2), 1e-12)
    worst = max(worst, grad, rel)
    return worst, lines, [f"| {case} | {l1:.9g} | {l2:.9g} | {rel:.1e} | {len(g1)} | {grad:.1e} |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing vlm-parity.md")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    work = Path(tempfile.mkdtemp(prefix="vlm-parity-"))
    make_inputs(work, args.rows)
    worst, metric_rows, grad_rows = 0.0, [], []
    for case in CASES:
        w, m, g = compare_case(work, case, args.rows)
        worst, metric_rows, grad_rows = max(worst, w), metric_rows + m, grad_rows + g
    text = "\n".join([
        f"# Vision-language SFT and DPO: alignkit vs TRL {trl.__version__}", "",
        "Command: `python benchmarks/compare_vlm_with_trl.py` (after `pip install -e \".[bench]\" -e "
        "plugins/alignkit-sft -e plugins/alignkit-dpo`)  ",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, no GPU; float32; torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}.  ",
        f"Model: builtin:tiny-vlm's architecture (Idefics3: 2-layer vision tower, 2-layer Llama; random weights, seed "
        f"11; DPO's reference: seed 12) with its processor; {args.rows} rows of builtin:shapes pictures with "
        "questions, one batch. alignkit's DPO does not compute TRL's eval_entropy, eval_logits/* and "
        "eval_mean_token_accuracy (marked not computed).", "",
        f"**Largest relative difference: {worst:.1e}** (target 1e-5).", "",
        "## Eval metrics (evaluate())", "",
        "| case | metric | alignkit | TRL | relative difference |", "|---|---|---:|---:|---:|", *metric_rows, "",
        "## One training step: loss and gradients", "",
        "The loss of one step on every row and, after `backward()`, the largest difference of any parameter's "
        "gradient relative to that parameter's largest TRL gradient (a parameter whose gradients stay below 1e-6 "
        "of the model's largest is measured against the model's largest: the attention key biases' true gradient "
        "is 0, and both sides hold rounding noise of about 1e-12 there).", "",
        "| case | loss (alignkit) | loss (TRL) | relative difference | parameters | gradient difference |",
        "|---|---:|---:|---:|---:|---:|", *grad_rows, ""])
    if args.no_write:
        print(text)
    else:
        out = Path(__file__).with_name("vlm-parity.md")
        out.write_text(text)
        print(f"largest relative difference: {worst:.2e}; wrote {out}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
