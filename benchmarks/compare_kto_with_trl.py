"""alignkit's KTO eval loss and metrics against TRL 1.16's KTOTrainer.evaluate() on the same model and data.

    pip install -e ".[bench]" -e plugins/alignkit-kto
    python benchmarks/compare_kto_with_trl.py

Writes benchmarks/kto-parity.md. Both sides run in float32 on the CPU, offline, in this environment
(trl 1.16 runs on transformers 5). Each case evaluates the whole data set as one eval batch, so TRL's mean of
per-batch values and alignkit's exact (sum, count) means are the same quantity, and TRL's KL rotation group
(its per_device_train_batch_size) covers the whole set, as alignkit's formatter (one preprocessing batch).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

#: name -> (data file, KTO settings, how the policy is given)
CASES = {
    "kto-unpaired": ("unpaired.jsonl", {"beta": 0.1}, "full"),
    "kto-weights": ("unpaired.jsonl", {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.75}, "full"),
    "apo_zero_unpaired": ("unpaired.jsonl", {"beta": 0.2, "loss_type": "apo_zero_unpaired"}, "full"),
    "kto-paired": ("paired.jsonl", {"beta": 0.1}, "full"),
    "kto-conversational": ("chat.jsonl", {"beta": 0.1}, "full"),
    "kto-truncated": ("unpaired.jsonl", {"beta": 0.1, "max_length": 12}, "full"),
    "kto-precomputed": ("unpaired.jsonl", {"beta": 0.1, "precompute_ref_log_probs": True}, "full"),
    "kto-lora": ("unpaired.jsonl", {"beta": 0.1}, "lora"),
    "apo_zero_unpaired-lora": ("paired.jsonl", {"beta": 0.1, "loss_type": "apo_zero_unpaired"}, "lora"),
}
LISTS = 16  # digit lists per data set: 32 unpaired examples


def make_inputs(work: Path) -> None:
    """A tiny random Llama (policy), another (reference), a LoRA adapter with non-zero weights, three data sets."""
    import torch
    from alignkit_kto.demo import sort_kto_rows
    from peft import LoraConfig, get_peft_model

    from alignkit.testing import tiny_model, tiny_tokenizer

    for name, seed in (("model", 11), ("ref", 12)):
        tiny_model(seed=seed).save_pretrained(work / name)
        tiny_tokenizer().save_pretrained(work / name)
    lora = get_peft_model(tiny_model(seed=12), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(13)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the adapter-free reference
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(work / "lora")
    everything = sort_kto_rows("test")
    keep = list(dict.fromkeys(r["prompt"] for r in everything))[:LISTS]
    rows = [r for r in everything if r["prompt"] in keep]  # both examples of LISTS lists, in the demo's shuffled order
    by_prompt: dict[str, dict] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"],
                             {"prompt": r["prompt"]})["chosen" if r["label"] else "rejected"] = r["completion"]
    paired = list(by_prompt.values())
    rows[0] = {**rows[0], "prompt": "sort: " + " ".join(["7"] * 9) + " ="}  # fills max_length 12: dropped there
    rows[1] = {**rows[1], "completion": " " + " ".join(["1"] * 9)}  # cut at max_length 12
    chat = [{"prompt": [{"role": "user", "content": r["prompt"].removesuffix(" =")}],
             "completion": [{"role": "assistant", "content": r["completion"].strip()}], "label": r["label"]}
             for r in rows]
    for name, data in (("unpaired.jsonl", rows), ("paired.jsonl", paired), ("chat.jsonl", chat)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in data))


def examples(work: Path, data: str) -> int:
    rows = (work / data).read_text().splitlines()
    return len(rows) * (2 if data == "paired.jsonl" else 1)


def alignkit_side(work: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import alignkit

    out = {}
    for case, (data, settings, policy) in CASES.items():
        n = examples(work, data)
        overrides = {"model.name_or_path": str(work / "model"), "data.train": str(work / data),
                     "train.per_device_eval_batch_size": n, "train.output_dir": str(work / "ak" / case)}
        overrides.update({f"method.{k}": v for k, v in settings.items()})
        model = None
        if policy == "lora":  # the reference is the policy with its adapters disabled
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "ref"), work / "lora")
            overrides["model.name_or_path"] = str(work / "ref")
        else:
            overrides["model.ref_name_or_path"] = str(work / "ref")
        out[case] = alignkit.evaluate("kto", model=model, **overrides)
    return out


def trl_side(work: Path) -> dict:
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    out = {}
    for case, (data, settings, policy) in CASES.items():
        n = examples(work, data)
        ref = AutoModelForCausalLM.from_pretrained(work / "ref")
        if policy == "lora":  # TRL's reference for a PEFT policy given with a ref_model: that model, the base here
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "ref"), work / "lora")
        else:
            model = AutoModelForCausalLM.from_pretrained(work / "model")
        tok = AutoTokenizer.from_pretrained(work / "model")
        ds = load_dataset("json", data_files=str(work / data), split="train")
        args = KTOConfig(output_dir=str(work / "trl" / case), per_device_eval_batch_size=n,
                         per_device_train_batch_size=n,
                         report_to=[], use_cpu=True, bf16=False, **settings)  # TRL's default bf16=True would
        # run its reference forwards (not the policy's) under bf16 autocast on the CPU: float32 on both sides
        trainer = KTOTrainer(model=model, ref_model=ref, args=args, processing_class=tok, train_dataset=ds,
                             eval_dataset=ds)
        metrics = trainer.evaluate()
        out[case] = {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in
                     ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                      "eval_model_preparation_time")}
    return out


GRADIENT_CASES = ("kto-unpaired", "apo_zero_unpaired", "kto-paired")


def gradients_alignkit(work: Path, case: str) -> tuple[float, dict]:
    """Training-mode loss and policy gradients of one step on the whole data set as one batch."""

    import alignkit
    from alignkit.engine.loop import Engine

    data, settings, _ = CASES[case]
    overrides = {"model.name_or_path": str(work / "model"), "model.ref_name_or_path": str(work / "ref"),
                 "data.train": str(work / data), "train.output_dir": str(work / "akg" / case),
                 **{f"method.{k}": v for k, v in settings.items()}}
    cfg, method = alignkit.load_config("kto", None, overrides)
    engine = Engine(cfg, method, alignkit.get_plugin_manager()).load()
    ds = engine.data.formatted(need_train=True)["train"]
    batch = engine.formatter.collate([ds[i] for i in range(len(ds))])
    engine.model.train()
    out = engine.loss(engine.model, batch, ref=engine.reference(engine.model, dict(batch)))
    loss = out.normalized({u: float(c) for u, c in engine.loss.counts(batch).items()})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def gradients_trl(work: Path, case: str) -> tuple[float, dict]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    data, settings, _ = CASES[case]
    n = examples(work, data)
    ds = load_dataset("json", data_files=str(work / data), split="train")
    args = KTOConfig(output_dir=str(work / "trlg" / case), per_device_train_batch_size=n, report_to=[], use_cpu=True,
                     bf16=False, **settings)
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "model"),
                         ref_model=AutoModelForCausalLM.from_pretrained(work / "ref"), args=args,
                         processing_class=AutoTokenizer.from_pretrained(work / "model"), train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def compare_gradients(work: Path) -> tuple[list[str], float]:
    lines, worst = [], 0.0
    for case in GRADIENT_CASES:
        (ours, g1), (theirs, g2) = gradients_alignkit(work, case), gradients_trl(work, case)
        assert g1.keys() == g2.keys(), set(g1) ^ set(g2)
        grad = max(float((g1[k] - g2[k]).abs().max() / g2[k].abs().max().clamp(min=1e-30)) for k in g1)
        rel = abs(ours - theirs) / abs(theirs)
        worst = max(worst, rel, grad)
        lines.append(f"| {case} | {ours:.9g} | {theirs:.9g} | {rel:.1e} | {grad:.1e} |")
    return lines, worst


def compare(ours: dict, theirs: dict) -> tuple[list[str], float, set[str]]:
    lines, worst, only_trl = [], 0.0, set()
    for case in CASES:
        a, b = ours[case], theirs[case]
        only_trl |= set(b) - set(a)
        assert not set(a) - set(b), (case, set(a) - set(b))
        for key in sorted(set(a) & set(b)):
            rel = abs(a[key] - b[key]) / max(abs(b[key]), 1e-12)
            if abs(a[key] - b[key]) < 1e-9:  # both (near) zero, e.g. rewards with policy == reference
                rel = 0.0
            worst = max(worst, rel)
            lines.append(f"| {case} | {key} | {a[key]:.9g} | {b[key]:.9g} | {rel:.1e} |")
    return lines, worst, only_trl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", help="folder for the models and data (default: a new temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    import transformers
    import trl

    work = Path(args.work or tempfile.mkdtemp(prefix="kto-parity-"))
    make_inputs(work)
    ours, theirs = alignkit_side(work), trl_side(work)
    lines, worst, only_trl = compare(ours, theirs)
    grad_lines, grad_worst = compare_gradients(work)
    header = [
        "# KTO eval loss and metrics: alignkit vs TRL 1.16 KTOTrainer.evaluate()", "",
        "Command: `python benchmarks/compare_kto_with_trl.py` (after `pip install -e \".[bench]\" -e "
        "plugins/alignkit-kto`)  ",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, no GPU; float32; torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}.  ",
        "Models: tiny random Llamas with the built-in tokenizer: the policy (alignkit.testing.tiny_model(seed=11)) "
        f"and the reference (seed 12, `model.ref_name_or_path` / TRL's `ref_model`); for *-lora the policy is the "
        f"reference plus a LoRA adapter with random non-zero weights, and the reference is that policy with its "
        f"adapters disabled (alignkit) / the base model given as `ref_model` (TRL). Data: {LISTS} digit lists of the "
        f"sort-kto demo, unpaired ({2 * LISTS} examples), paired and conversational; one eval batch holding every "
        f"example; TRL's KL rotation group (per_device_train_batch_size) is the whole set, as alignkit's.", "",
        f"**Largest relative difference: {worst:.1e}** (target 1e-5; differences below 1e-9 absolute count as 0). "
        f"Reported by TRL only: {', '.join(sorted(only_trl)) or 'none'} (`num_tokens` is TRL's count of training "
        "tokens so far, 0 in a pure evaluation).", "",
        "| case | metric | alignkit | TRL 1.16 | relative difference |", "|---|---|---:|---:|---:|",
    ]
    lines += [
        "", "## One training step", "",
        "The training-mode loss (`KTOTrainer.compute_loss` on its train dataloader's batch, which holds every "
        "example) and the gradient of every policy parameter after `backward()`, against alignkit's loss on the "
        "same examples. Gradient difference: the largest over parameters of max|g_alignkit - g_TRL| / max|g_TRL|. "
        f"**Largest difference: {grad_worst:.1e}.**", "",
        "| case | loss (alignkit) | loss (TRL 1.16) | relative difference | gradient difference |",
        "|---|---:|---:|---:|---:|", *grad_lines,
    ]
    worst = max(worst, grad_worst)
    out = Path(__file__).with_name("kto-parity.md")
    out.write_text("\n".join(header + lines) + "\n")
    print(f"largest relative difference (metrics and gradients): {worst:.2e}; wrote {out}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
