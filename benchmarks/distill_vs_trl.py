"""distill side by side: alignkit and TRL 1.16's GKDTrainer, one training step at a time on the same rows, on this
CPU: seconds per step and the memory a step adds above the loaded models.

A student and a teacher with the tiny model's body and a 32,000-token vocabulary (the size of common tokenizers,
where the logits dominate memory; the teacher's output embedding scaled by 20, a peaked teacher), 8 rows of 64
prompt + 192 completion tokens, beta 0.5, lmbda 0 (steps on the data's completions: sampling is not what is
compared), plain SGD. Each side runs in its own process: STEPS steps of
loss, backward and optimizer step; reported are the mean seconds of the steps after the first and the peak resident
memory (ru_maxrss) minus the resident memory just before the first step.

    pip install -e ".[bench]" -e plugins/alignkit-distill
    OMP_NUM_THREADS=2 python benchmarks/distill_vs_trl.py            # writes benchmarks/distill-vs-trl.md
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS, PROMPT, COMPLETION, VOCAB, STEPS = 8, 64, 192, 32000, 6


def make_inputs(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.testing import tiny_model, tiny_tokenizer

    for name, seed in (("student", 1), ("teacher", 2)):
        config = tiny_model().config.to_dict() | {"vocab_size": VOCAB}
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(type(tiny_model().config)(**config))
        if name == "teacher":  # a peaked teacher (its tied embedding scaled), so the divergence is far from 0
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(20.0)
        model.save_pretrained(work / name)
        tiny_tokenizer().save_pretrained(work / name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 384, (ROWS, PROMPT + COMPLETION), generator=g).tolist()  # the tokenizer's ids
    (work / "rows.json").write_text(json.dumps(ids))


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def batch_of(work: Path):
    import torch

    ids = torch.tensor(json.loads((work / "rows.json").read_text()))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def alignkit_steps(work: Path):
    """(model, step function): alignkit's distill loss through its engine's loss and reference."""
    import alignkit_distill

    import alignkit
    from alignkit.engine.loop import Engine
    from alignkit.testing import plugin_manager

    pm = plugin_manager(alignkit_distill)
    cfg, method = alignkit.load_config("distill", None, {
        "model.name_or_path": str(work / "student"), "model.ref_name_or_path": str(work / "teacher"),
        "data.train": "builtin:sort-distill", "train.output_dir": str(work / "ak"), "method.beta": 0.5,
        "method.lmbda": 0.0}, plugins=pm)
    engine = Engine(cfg, method, pm).load()
    batch = batch_of(work)

    def step():
        out = engine.loss(engine.model, batch, ref=engine.reference(engine.model, dict(batch)))
        loss = out.normalized({u: float(c) for u, c in engine.loss.counts(batch).items()})
        loss.backward()
        return loss

    return engine.model, step


def trl_steps(work: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    ds = Dataset.from_list([{"input_ids": r, "prompt": "", "completion_mask": [0] * PROMPT + [1] * COMPLETION}
                            for r in json.loads((work / "rows.json").read_text())])
    args = GKDConfig(output_dir=str(work / "trl"), per_device_train_batch_size=ROWS, beta=0.5, lmbda=0.0,
                     report_to=[], use_cpu=True, bf16=False, max_length=PROMPT + COMPLETION)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(work / "student"),
                         teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher"), args=args,
                         processing_class=AutoTokenizer.from_pretrained(work / "student"), train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()

    def step():
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss

    return trainer.model, step


def child(side: str, work: Path) -> None:
    import torch

    model, step = (alignkit_steps if side == "alignkit" else trl_steps)(work)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = rss_mib()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        loss = step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s_per_step": sum(times[1:]) / (STEPS - 1), "step_mib": peak - before,
                      "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["alignkit", "trl"])
    parser.add_argument("--work")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.child:
        return child(args.child, Path(args.work))
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-speed-"))
    make_inputs(work)
    results = {}
    for side in ("alignkit", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--child", side, "--work", str(work)], capture_output=True,
                              text=True, check=True)
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    a, t = results["alignkit"], results["trl"]
    lines = [
        "# distill: alignkit vs TRL 1.16 GKDTrainer, one training step on this CPU", "",
        "Command: `OMP_NUM_THREADS=2 python benchmarks/distill_vs_trl.py`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}. Date: {date.today()}.", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        "| | s / step | memory a step adds (MiB) | loss |", "|---|---:|---:|---:|",
        *(f"| {side} | {r['s_per_step']:.3f} | {r['step_mib']:.0f} | {r['loss']:.6g} |" for side, r in results.items()),
        "", f"alignkit / TRL: **{a['s_per_step'] / t['s_per_step']:.2f}x the step time, "
        f"{a['step_mib'] / max(t['step_mib'], 1):.2f}x the step memory** (targets 0.7x and 0.8x).",
    ]
    (HERE / "distill-vs-trl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
