"""alignkit's reward method against TRL 1.16's RewardTrainer on the same model and rows: eval loss and metrics
(`RewardTrainer.evaluate()`) and one training step's loss and gradients (`compute_loss` + `backward()`).

    pip install -e ".[bench]" -e plugins/alignkit-reward
    python benchmarks/compare_reward_with_trl.py

Writes benchmarks/reward-parity.md. Both sides run in float32 on the CPU, offline. Each case holds every pair in
one eval batch (and one training batch), so TRL's mean of per-batch values and alignkit's exact (sum, count)
means are the same quantity. The model is a tiny random Llama saved as a one-label sequence classifier (its score
head drawn once), so both sides start from the very same weights.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

#: name -> (data file, reward settings)
CASES = {
    "standard": ("standard.jsonl", {}),
    "implicit-prompt": ("implicit.jsonl", {}),
    "conversational": ("chat.jsonl", {}),
    "margin": ("margin.jsonl", {}),
    "center-rewards": ("standard.jsonl", {"center_rewards_coefficient": 0.01}),
    "max-length": ("standard.jsonl", {"max_length": 14}),
    "conversational-margin-center": ("chat-margin.jsonl", {"center_rewards_coefficient": 0.05}),
    "lora": ("standard.jsonl", {}),  # the classifier plus a LoRA adapter (random non-zero weights, its own head)
}
GRADIENT_CASES = ("standard", "conversational", "margin", "center-rewards")
PAIRS = 16


def make_inputs(work: Path) -> None:
    """The classifier (tiny Llama + a score head) and the data sets: PAIRS pairs of the sort demo's test split."""
    import random

    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.blocks.demo import N_TEST, N_TRAIN, load_sort
    from alignkit.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(seed=11).save_pretrained(work / "lm")
    torch.manual_seed(12)
    model = AutoModelForSequenceClassification.from_pretrained(work / "lm", num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # scores of a few units: the loss is far from log 2
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["score"], task_type="SEQ_CLS"))
    torch.manual_seed(13)
    with torch.no_grad():  # a trained-looking adapter and head: the model differs from its base
        for name, p in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(work / "lora")
    assert N_TEST >= PAIRS and N_TRAIN
    rows = list(load_sort("sort", "test").select(range(PAIRS)))
    rows[0] = {**rows[0], "prompt": "sort: " + " ".join(["7"] * 9) + " ="}  # longer than max-length 14: dropped
    chat = list(load_sort("sort-chat", "test").select(range(PAIRS)))
    rng = random.Random(5)
    data = {
        "standard.jsonl": rows,
        "implicit.jsonl": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                           for r in rows],
        "chat.jsonl": chat,
        "margin.jsonl": [{**r, "margin": round(rng.uniform(-1, 2), 3)} for r in rows],
        "chat-margin.jsonl": [{**r, "margin": round(rng.uniform(-1, 2), 3)} for r in chat],
    }
    for name, items in data.items():
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in items))


def pairs(work: Path, data: str) -> int:
    return len((work / data).read_text().splitlines())


def alignkit_side(work: Path) -> dict:
    import alignkit

    out = {}
    for case, (data, settings) in CASES.items():
        overrides = {"model.name_or_path": str(work / "model"), "data.train": str(work / data),
                     "train.per_device_eval_batch_size": pairs(work, data),
                     "train.output_dir": str(work / "ak" / case)}
        overrides.update({f"method.{k}": v for k, v in settings.items()})
        out[case] = alignkit.evaluate("reward", model=_model(work, case), **overrides)
    return out


def _model(work: Path, case: str):
    """The model of a case: the classifier, or (lora) the classifier with the adapter on."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(work / "model")
    return PeftModel.from_pretrained(model, work / "lora") if case == "lora" else model


def _trainer(work: Path, case: str, folder: str, eval_data: bool):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    data, settings = CASES[case]
    n = pairs(work, data)
    ds = load_dataset("json", data_files=str(work / data), split="train")
    args = RewardConfig(output_dir=str(work / folder / case), per_device_eval_batch_size=n,
                        per_device_train_batch_size=n, report_to=[], use_cpu=True, bf16=False,
                        gradient_checkpointing=False, **settings)  # float32 on both sides
    return RewardTrainer(model=_model(work, case), args=args,
                         processing_class=AutoTokenizer.from_pretrained(work / "model"), train_dataset=ds,
                         eval_dataset=ds if eval_data else None)


def trl_side(work: Path) -> dict:
    out = {}
    for case in CASES:
        metrics = _trainer(work, case, "trl", True).evaluate()
        out[case] = {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in
                     ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                      "eval_model_preparation_time")}
    return out


def gradients_alignkit(work: Path, case: str, share_prompt: bool | None = None) -> tuple[float, dict]:
    """Training-mode loss and gradients of one step on the whole data set as one batch (share_prompt: the method's
    setting; None its default, pairs sharing their prompt's forward; False TRL's padded [chosen; rejected] batch)."""
    import alignkit
    from alignkit import Engine

    data, settings = CASES[case]
    overrides = {"model.name_or_path": str(work / "model"), "data.train": str(work / data),
                 "train.output_dir": str(work / "akg" / case), **{f"method.{k}": v for k, v in settings.items()}}
    if share_prompt is not None:
        overrides["method.share_prompt"] = share_prompt
    cfg, method = alignkit.load_config("reward", None, overrides)
    engine = Engine(cfg, method, alignkit.get_plugin_manager()).load()
    ds = engine.data.formatted(need_train=True)["train"]
    batch = engine.formatter.collate([ds[i] for i in range(len(ds))])
    engine.model.train()
    out = engine.loss(engine.model, batch)
    loss = out.normalized({u: float(c) for u, c in engine.loss.counts(batch).items()})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}


def gradients_trl(work: Path, case: str) -> tuple[float, dict]:
    from torch.utils.data import SequentialSampler

    trainer = _trainer(work, case, "trlg", False)
    # the rows in file order, as alignkit's batch holds them: the same sums in the same order (shuffled, the
    # gradients differ by float32 rounding of the reordered sums, up to ~2e-5 of a tensor's largest entry)
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def compare_gradients(work: Path, share_prompt: bool | None = None) -> tuple[list[str], float]:
    lines, worst = [], 0.0
    for case in GRADIENT_CASES:
        (ours, g1), (theirs, g2) = gradients_alignkit(work, case, share_prompt), gradients_trl(work, case)
        assert g1.keys() == g2.keys(), set(g1) ^ set(g2)
        grad = max(float((g1[k] - g2[k]).abs().max() / g2[k].abs().max().clamp(min=1e-30)) for k in g1)
        rel = abs(ours - theirs) / abs(theirs)
        worst = max(worst, rel, grad)
        lines.append(f"| {case} | {ours:.9g} | {theirs:.9g} | {rel:.1e} | {grad:.1e} |")
    return lines, worst


def compare(ours: dict, theirs: dict) -> tuple[list[str], float, set[str], set[str]]:
    """Table lines, the largest relative difference over the metrics both report, and the names only one reports."""
    lines, worst, only_trl, only_ours = [], 0.0, set(), set()
    for case in CASES:
        a, b = ours[case], theirs[case]
        only_trl |= set(b) - set(a)
        only_ours |= set(a) - set(b)
        for key in sorted(set(a) & set(b)):
            rel = 0.0 if abs(a[key] - b[key]) < 1e-9 else abs(a[key] - b[key]) / max(abs(b[key]), 1e-12)
            worst = max(worst, rel)
            lines.append(f"| {case} | {key} | {a[key]:.9g} | {b[key]:.9g} | {rel:.1e} |")
    return lines, worst, only_trl, only_ours


# ---- speed and memory (--speed N): each side in its own process, the same model, rows and settings ----------------

SPEED_MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4}
SPEED_PAIRS, SPEED_BATCH, ROUNDS = 256, 16, 3


def speed_inputs(work: Path) -> None:
    """A larger random Llama classifier and SPEED_PAIRS pairs of about 100 tokens (sort prompts of 40 digits)."""
    import random

    import torch
    from transformers import AutoModelForSequenceClassification

    from alignkit.testing import tiny_model, tiny_tokenizer

    tiny_model(seed=21, **SPEED_MODEL).save_pretrained(work / "speed-lm")
    torch.manual_seed(22)
    model = AutoModelForSequenceClassification.from_pretrained(work / "speed-lm", num_labels=1)
    model.config.pad_token_id = tiny_tokenizer().pad_token_id
    model.save_pretrained(work / "speed-model")
    tiny_tokenizer().save_pretrained(work / "speed-model")
    rng = random.Random(3)
    rows = []
    for _ in range(SPEED_PAIRS):
        digits = [rng.randrange(10) for _ in range(rng.randrange(30, 41))]
        wrong = digits[:]
        rng.shuffle(wrong)
        rows.append({"prompt": "sort: " + " ".join(map(str, digits)) + " =",
                     "chosen": " " + " ".join(map(str, sorted(digits))), "rejected": " " + " ".join(map(str, wrong))})
    (work / "speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _timed_run(side: str, work: Path, steps: int) -> float:
    """Wall seconds of `steps` optimizer steps of SPEED_BATCH pairs (setup included; the caller subtracts a 1-step
    run), learning rate 1e-4, float32, no gradient checkpointing, no evaluation or saving."""
    import time

    start = time.perf_counter()
    if side == "alignkit":
        import alignkit

        alignkit.run("reward", **{
            "model.name_or_path": str(work / "speed-model"), "data.train": str(work / "speed.jsonl"),
            "train.output_dir": str(work / f"speed-ak-{steps}"), "train.max_steps": steps,
            "train.per_device_train_batch_size": SPEED_BATCH, "train.learning_rate": 1e-4, "train.save_steps": None,
            "train.eval_steps": None, "train.eval_on_start": False, "train.plots": False, "train.disable_tqdm": True,
            "train.logging_steps": steps, "train.overwrite_output_dir": True})
    else:
        from datasets import load_dataset
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(output_dir=str(work / f"speed-trl-{steps}"), per_device_train_batch_size=SPEED_BATCH,
                            max_steps=steps, learning_rate=1e-4, report_to=[], use_cpu=True, bf16=False,
                            gradient_checkpointing=False, save_strategy="no", logging_steps=steps, disable_tqdm=True)
        RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(work / "speed-model"), args=args,
                      processing_class=AutoTokenizer.from_pretrained(work / "speed-model"),
                      train_dataset=load_dataset("json", data_files=str(work / "speed.jsonl"), split="train")).train()
    return time.perf_counter() - start


def speed_side(side: str, work: Path, steps: int) -> None:
    """Printed as JSON: seconds per step (an N-step run less a 1-step run, over N - 1), this process's peak RSS."""
    import resource

    one = _timed_run(side, work, 1)
    many = _timed_run(side, work, steps)
    print(json.dumps({"step_s": (many - one) / (steps - 1),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def compare_speed(work: Path, steps: int) -> list[str]:
    import subprocess

    speed_inputs(work)
    got = {"alignkit": [], "trl": []}
    for _ in range(ROUNDS):  # alternating, so that a shared machine's load falls on both sides alike
        for side in got:
            proc = subprocess.run([sys.executable, __file__, "--work", str(work), "--speed-side", side, "--speed",
                                   str(steps)], capture_output=True, text=True, check=True)
            got[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    a, t = ({key: min(r[key] for r in runs) for key in runs[0]} for runs in got.values())
    spread = {side: [round(r["step_s"], 3) for r in runs] for side, runs in got.items()}
    return [
        "", "## Speed and memory", "",
        f"`python benchmarks/compare_reward_with_trl.py --speed {steps}`: a random Llama classifier "
        f"({SPEED_MODEL['num_hidden_layers']} layers, hidden {SPEED_MODEL['hidden_size']}), {SPEED_PAIRS} pairs of "
        f"about 100 tokens per sequence, {SPEED_BATCH} pairs per step, float32, no gradient checkpointing (TRL's "
        "default is on), no evaluation; each side in its own process. Seconds per optimizer step: an N-step run less "
        "a 1-step run, over N - 1; peak RSS of the process. Both run the same classifier forward and backward on the "
        "same padded batches (there is no LM head to fuse), so the ratio measures the loop's overhead only. "
        f"{ROUNDS} rounds, alternating, the fastest of each side shown (all rounds, seconds per step: alignkit "
        f"{spread['alignkit']}, TRL {spread['trl']}: on a shared machine single runs vary by tens of percent).", "",
        "| | alignkit | TRL 1.16 | ratio |", "|---|---:|---:|---:|",
        f"| seconds per step | {a['step_s']:.3f} | {t['step_s']:.3f} | {a['step_s'] / t['step_s']:.2f} |",
        f"| peak RSS (MiB) | {a['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | "
        f"{a['peak_rss_mib'] / t['peak_rss_mib']:.2f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", help="folder for the model and data (default: a new temporary one)")
    parser.add_argument("--speed", type=int, default=0, help="also time N training steps of each side")
    parser.add_argument("--speed-side", choices=("alignkit", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_side:
        return speed_side(args.speed_side, Path(args.work), args.speed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    import transformers
    import trl

    work = Path(args.work or tempfile.mkdtemp(prefix="reward-parity-"))
    make_inputs(work)
    lines, worst, only_trl, only_ours = compare(alignkit_side(work), trl_side(work))
    grad_lines, grad_worst = compare_gradients(work, share_prompt=False)
    shared_lines, shared_worst = compare_gradients(work)
    header = [
        "# Reward model: alignkit vs TRL 1.16 RewardTrainer", "",
        "Command: `python benchmarks/compare_reward_with_trl.py` (after `pip install -e \".[bench]\" -e "
        "plugins/alignkit-reward`)  ",
        f"Date: {datetime.date.today()}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
        f"cores, no GPU; float32; torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}.  ",
        "Model: a tiny random Llama (alignkit.testing.tiny_model(seed=11)) loaded as a one-label "
        "LlamaForSequenceClassification with a score head drawn N(0, 0.5), saved once and loaded by both sides. "
        f"Data: {PAIRS} pairs of the sort demo's test split (one prompt lengthened to 9 digits, which max_length 14 "
        "drops on both sides): standard with an explicit prompt, standard with the prompt inside each answer "
        "(implicit), conversational (the built-in chat template), both with a random `margin` column, and (lora) the "
        "classifier with a LoRA adapter of random non-zero weights and its own score head (`modules_to_save`). Every "
        "pair in one eval batch and in one training batch.", "",
        f"**Largest relative difference: {worst:.1e}** (target 1e-5; differences below 1e-9 absolute count as 0). "
        f"Reported by TRL only: {', '.join(sorted(only_trl)) or 'none'} (min/max reward are per-batch extremes, "
        "averaged over batches: not an exact mean, so alignkit does not log them). Reported by alignkit only: "
        f"{', '.join(sorted(only_ours)) or 'none'}.", "",
        "| case | metric | alignkit | TRL 1.16 | relative difference |", "|---|---|---:|---:|---:|",
    ]
    lines += [
        "", "## One training step", "",
        "The training-mode loss (`RewardTrainer.compute_loss` on its train dataloader's batch, which holds every "
        "pair, in file order as alignkit's batch) and the gradient of every parameter after `backward()`, against "
        "alignkit's loss on the same pairs. "
        "Gradient difference: the largest over parameters of max|g_alignkit - g_TRL| / max|g_TRL|. With "
        "`method.share_prompt=false` alignkit runs TRL's layout, the padded [chosen; rejected] batch: "
        f"**largest difference {grad_worst:.1e}.**", "",
        "| case | loss (alignkit) | loss (TRL 1.16) | relative difference | gradient difference |",
        "|---|---:|---:|---:|---:|", *grad_lines, "",
        "With the default (`share_prompt` on: each pair one row, its prompt run once, the score read at each "
        "side's last token) the same sums come in other shapes, so float32 rounding moves the gradients by up to "
        f"**{shared_worst:.1e}** of a tensor's largest entry:", "",
        "| case | loss (alignkit) | loss (TRL 1.16) | relative difference | gradient difference |",
        "|---|---:|---:|---:|---:|", *shared_lines,
    ]
    worst = max(worst, grad_worst)
    if args.speed:
        lines += compare_speed(work, args.speed)
    out = Path(__file__).with_name("reward-parity.md")
    out.write_text("\n".join(header + lines) + "\n")
    print(f"largest relative difference (metrics and gradients): {worst:.2e}; wrote {out}")
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
