"""ORPO training speed and memory, alignkit against TRL's ORPOTrainer, on the same model and data.

    pip install -e ".[bench]"                  # TRL (trl.experimental.orpo)
    pip install --no-deps liger-kernel         # for --libs liger: its chunked losses need only torch (its triton
                                               # dependency is for the GPU kernels)
    python benchmarks/orpo_speed.py            # the full matrix -> benchmarks/RESULTS.md
    python benchmarks/orpo_speed.py --vocab 151936 --seq 512 --pairs 4 --no-write

Every (library, case) trains in its own process: a randomly initialised model of Qwen2 architecture
(same seed, same weights), identical preference rows truncated to exactly `seq` tokens a side, AdamW at
a constant learning rate. Reported: seconds per optimizer step (median after the warm-up steps), tokens
per second (prompt + answers of both sides), peak memory (max RSS on CPU, max_memory_allocated on GPU)
and the first losses, which must agree. A process over --mem-limit-gb of RSS is stopped and reported as
such. `--prep` also times preprocessing (examples/s) of the same 2000 rows through each library's
tokenization, and checks that both give the same token ids.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_compare import VARIANTS, liger_trainer, liger_version, methods_table, peak_flops, run_rounds, write_section
from bench_compare import table as compare_table
from bench_data import dialogue_rows, synthetic_rows

HERE = Path(__file__).parent
SIZES = {  # model shapes: a small random one for CPUs, Qwen2-0.5B's for a GPU
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "h256": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),  # issue 15's measurement shape
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
}


# ---- shared by both workers -------------------------------------------------------------------------

def build(case: dict):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from alignkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    layers = {"num_hidden_layers": case["layers"]} if case.get("layers") else {}  # the shape with fewer layers
    config = Qwen2Config(vocab_size=case["vocab"], max_position_embeddings=max(4096, case["seq"]),
                         tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **{**SIZES[case["size"]], **layers})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case["device"] == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, tok


def rows(case: dict, n: int, distinct: bool = False) -> list[dict]:
    """The case's rows: `synthetic` (every side exactly seq tokens) or `dialogue` (multi-turn, prompt over half)."""
    if case.get("data", "synthetic") == "dialogue":
        from alignkit.testing import tiny_tokenizer

        # one batch of distinct rows, seen once per step (an epoch): every library's step 1 sees the same rows
        return dialogue_rows(case["pairs"], case["seq"], tiny_tokenizer(), seed=0)
    return synthetic_rows(n, case["seq"], distinct)


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(case: dict, ends: list[float], losses: list[float], model=None) -> dict:
    steps = [b - a for a, b in zip(ends, ends[1:])][case["warmup"] - 1:]
    step_s = statistics.median(steps)
    tokens = case.get("tokens") or 2 * case["pairs"] * case["seq"]
    out = {"step_s": step_s, "steps": steps, "tokens_per_s": tokens / step_s,
           "peak_mb": peak_memory_mb(case["device"]), "losses": losses[:3], "status": "ok"}
    if case["device"] == "cuda" and model is not None:  # model FLOPs utilisation: 6 N per trained token
        out["mfu"] = 6 * sum(p.numel() for p in model.parameters()) * tokens / step_s / peak_flops()
    return out


# ---- the workers ----------------------------------------------------------------------------------------

def alignkit_worker(case: dict) -> dict:
    import datasets

    import alignkit
    from alignkit import hookimpl

    model, tok = build(case)
    ends, losses = [], []

    class Timer:
        @hookimpl
        def on_train_start(self, run):
            ends.append(time.perf_counter())

        @hookimpl
        def on_step_end(self, run, step, metrics):
            if case["device"] == "cuda":
                import torch

                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            losses.append(metrics["loss"])

    with tempfile.TemporaryDirectory() as out:
        config = {
            "train": {"output_dir": out, "max_steps": case["steps"], "per_device_train_batch_size": case["pairs"],
                      "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                      "logging_steps": 1, "save_steps": None, "eval_steps": None, "eval_on_start": False,
                      "disable_tqdm": True, "gradient_checkpointing": case["gc"], "bf16": case["device"] == "cuda",
                      "seed": 0},
            "method": {"max_length": case["seq"], "max_prompt_length": case["seq"] // 2, "beta": 0.1,
                       **case.get("alignkit", {})},
        }
        ds = datasets.Dataset.from_list(rows(case, case["steps"] * case["pairs"]))
        if case.get("method", "orpo") != "orpo":  # another method on the shared log-prob path, same batch
            config["method"] = {k: v for k, v in config["method"].items() if k != "beta"}
        pm = alignkit.get_plugin_manager([Timer()])
        alignkit.run(case.get("method", "orpo"), config, plugins=pm, model=model, tokenizer=tok, train_dataset=ds)
    return summary(case, ends, losses, model)


def trl_worker(case: dict, lib: str = "trl") -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tok = build(case)
    ends, losses = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if case["device"] == "cuda":
                import torch

                torch.cuda.synchronize()
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        args = ORPOConfig(output_dir=out, max_steps=case["steps"], per_device_train_batch_size=case["pairs"],
                          learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                          optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
                          disable_tqdm=True, gradient_checkpointing=case["gc"], bf16=case["device"] == "cuda",
                          use_cpu=case["device"] == "cpu", seed=0, max_length=case["seq"], beta=0.1)
        ds = datasets.Dataset.from_list(rows(case, case["steps"] * case["pairs"]))
        trainer_class = ORPOTrainer
        if lib == "liger":
            trainer_class = liger_trainer(ORPOTrainer, case["liger_compiled"])
        trainer_class(model=model, args=args, processing_class=tok, train_dataset=ds, callbacks=[Timer()]).train()
    return summary(case, ends, losses, model)


def prep_worker(case: dict) -> dict:
    """Examples per second of each library's preprocessing of the same rows (in memory, no cache)."""
    import datasets
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from alignkit.engine.data import prepare
    from alignkit_orpo import ORPOMethodConfig, PreferenceFormatter

    datasets.disable_caching()
    model, tok = build(case)
    data = datasets.Dataset.from_list(synthetic_rows(case["n"], case["seq"] // 4, distinct=True))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = ORPOConfig(output_dir=tmp, report_to="none", use_cpu=True, max_length=case["seq"])
        trainer = ORPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data.select(range(4)))
        start = time.perf_counter()
        trl_ds = data.map(maybe_extract_prompt).map(maybe_apply_chat_template, fn_kwargs={"processing_class": tok})
        trl_ds = trl_ds.map(trainer.tokenize_row)
        out["trl_examples_per_s"] = case["n"] / (time.perf_counter() - start)
    formatter = PreferenceFormatter(ORPOMethodConfig(max_length=case["seq"], max_prompt_length=case["seq"] // 2), tok)
    formatter.prepare_model(model)
    start = time.perf_counter()
    ours, _ = prepare(data, formatter, "bench")
    out["alignkit_examples_per_s"] = case["n"] / (time.perf_counter() - start)
    out["same_ids"] = all(ours[k] == trl_ds[k] for k in ("chosen_input_ids", "rejected_input_ids", "chosen_labels",
                                                          "rejected_labels", "prompt_input_ids"))
    return out


def liger_worker(case: dict) -> dict:
    return trl_worker({**case, "liger_compiled": case.get("liger_compiled", True)}, lib="liger")


WORKERS = {"alignkit": alignkit_worker, "trl": trl_worker, "liger": liger_worker, "prep": prep_worker}


# ---- the driver ------------------------------------------------------------------------------------------

def run_worker(lib: str, case: dict, mem_limit_gb: float, timeout_s: float, script: str = __file__) -> dict:
    """Run one worker process, stopping it above the memory limit; its JSON result or a status."""
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, script, "--worker", lib, "--case", json.dumps(case)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start, peak = time.monotonic(), 0.0
    while proc.poll() is None:
        try:
            rss_kb = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS"))
            peak = max(peak, rss_kb / 2**20)
        except (OSError, StopIteration):
            pass
        if peak > mem_limit_gb or time.monotonic() - start > timeout_s:
            proc.kill()
            proc.wait()
            what = f"over {mem_limit_gb:g} GB" if peak > mem_limit_gb else f"over {timeout_s:g} s"
            return {"status": what}
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": f"failed: {(stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    return json.loads(lines[-1])


def versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{p} {md.version(p)}"
                     for p in ("torch", "transformers", "accelerate", "datasets", "trl", "alignkit"))


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table(results: list[dict]) -> list[str]:
    lines = ["| vocab | seq | pairs | grad ckpt | s/step alignkit | s/step TRL | time ratio | tokens/s alignkit | "
             "tokens/s TRL | peak MB alignkit | peak MB TRL | memory ratio | first losses alignkit | "
             "first losses TRL |",
             "|" + "---|" * 14]
    for r in results:
        c, a, t = r["case"], r["alignkit"], r.get("trl", {"status": "not run"})
        ok = a.get("status") == "ok" and t.get("status") == "ok"
        time_ratio = fmt(a["step_s"] / t["step_s"], ".2f") if ok else "-"
        mem_ratio = fmt(a["peak_mb"] / t["peak_mb"], ".2f") if ok else "-"

        def side(x, key, spec):
            return fmt(x.get(key), spec) if x.get("status") == "ok" else x.get("status", "-")

        def losses(x):
            return " ".join(f"{v:.4f}" for v in x["losses"]) if x.get("status") == "ok" else "-"

        lines.append(f"| {c['vocab']} | {c['seq']} | {c['pairs']} | {'yes' if c['gc'] else 'no'} | "
                     f"{side(a, 'step_s', '.3f')} | {side(t, 'step_s', '.3f')} | {time_ratio} | "
                     f"{side(a, 'tokens_per_s', '.0f')} | {side(t, 'tokens_per_s', '.0f')} | "
                     f"{side(a, 'peak_mb', '.0f')} | {side(t, 'peak_mb', '.0f')} | {mem_ratio} | {losses(a)} | "
                     f"{losses(t)} |")
    return lines


def kept_sections(path: Path) -> str:
    """The sections of an existing results file that the matrix run does not write (hand notes, --section runs)."""
    text = path.read_text() if path.exists() else ""
    parts = text.split("\n## ")[1:]
    return "".join("\n## " + part for part in parts if not part.startswith("Preprocessing"))


def compare(args) -> None:
    """Every variant of --libs on each case, interleaved in --rounds, into one section of --output."""
    rows = []
    for vocab in args.vocab:
        for seq in args.seq:
            for pairs in args.pairs:
                case = dict(vocab=vocab, seq=seq, pairs=pairs, gc=args.gc == "yes", steps=args.steps,
                            warmup=args.warmup,
                            size=args.size, device=args.device, data=args.data)
                rows.append(run_rounds(case, args.libs, args.rounds, run_worker, args.mem_limit_gb, args.timeout))
                print("\n".join(compare_table(rows[-1:], args.libs)), flush=True)
    lines = [f"- command: `python benchmarks/orpo_speed.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine(args.device)}; {args.note}".rstrip("; "), f"- versions: {versions()}, liger-kernel "
             f"{liger_version()}", f"- model: random Qwen2, shape `{args.size}` {SIZES[args.size]}, tied embeddings, "
             f"{'bf16' if args.device == 'cuda' else 'float32'}; gradient checkpointing {args.gc}",
             f"- {args.steps} steps per run, the first {args.warmup} not timed, {args.rounds} interleaved round(s); "
             "ratios are the row's variant over TRL / Liger (compiled); peak memory is max RSS (CPU) or "
             "max_memory_allocated (GPU)", "", *compare_table(rows, args.libs)]
    print("\n".join(lines))
    if not args.no_write:
        write_section(Path(args.output), args.section, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--pairs", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--gc", choices=["no", "yes", "both"], default="both", help="gradient checkpointing")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", choices=SIZES, default="small", help="model shape")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mem-limit-gb", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--prep", action="store_true", help="also time preprocessing")
    p.add_argument("--libs", nargs="+", choices=list(VARIANTS), default=["alignkit", "trl"],
                   help="with --section: the variants to compare (bench_compare.py), else alignkit and/or trl")
    p.add_argument("--data", choices=["synthetic", "dialogue"], default="synthetic",
                   help="synthetic: every side exactly seq tokens; dialogue: multi-turn rows, prompt over half "
                   "(bench_data.py)")
    p.add_argument("--rounds", type=int, default=1, help="with --section: interleaved rounds of all variants")
    p.add_argument("--section", help="head-to-head mode: write this section of --output (others kept)")
    p.add_argument("--note", default="", help="with --section: a line about the machine's load etc.")
    p.add_argument("--methods", nargs="+", default=[], metavar="METHOD",
                   help="also run these alignkit methods (e.g. dpo cpo simpo) on each case: memory and time against "
                   "ORPO")
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--update", action="store_true",
                   help="rerun only these cases: replace their rows in the existing RESULTS.json/.md, keep the rest")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.case))), flush=True)
        return

    if args.section:
        compare(args)
        return
    results = []
    gcs = {"no": [False], "yes": [True], "both": [False, True]}[args.gc]
    for vocab in args.vocab:
        for seq in args.seq:
            for pairs in args.pairs:
                for gc in gcs:
                    case = dict(vocab=vocab, seq=seq, pairs=pairs, gc=gc, steps=args.steps, warmup=args.warmup,
                                size=args.size, device=args.device)
                    row = {"case": case}
                    for lib in args.libs:
                        row[lib] = run_worker(lib, case, args.mem_limit_gb, args.timeout)
                    for method in args.methods:
                        row[method] = run_worker("alignkit", {**case, "method": method}, args.mem_limit_gb,
                                                 args.timeout)
                    results.append(row)
                    print(table([row])[-1], flush=True)
                    if args.methods:
                        print(methods_table([row], args.methods)[-1], flush=True)
    extra = ["## Other methods on the shared log-prob path (alignkit.blocks.logps), same batches", "",
             *methods_table(results, args.methods), ""] if args.methods else []
    prep = None
    if args.prep:
        prep = run_worker("prep", dict(vocab=args.vocab[0], seq=512, n=2000, size="small", device="cpu"),
                          args.mem_limit_gb, args.timeout)
        print("preprocessing:", json.dumps(prep), flush=True)

    commands = ["python benchmarks/orpo_speed.py " + " ".join(sys.argv[1:])]
    saved = Path(args.output).with_suffix(".json")
    if args.update and saved.exists():
        old = json.loads(saved.read_text())
        fresh = {json.dumps(r["case"], sort_keys=True) for r in results}
        results = [r for r in old["results"] if json.dumps(r["case"], sort_keys=True) not in fresh] + results
        order = [(v, q, n, g) for v in (32000, 151936) for q in (512, 2048) for n in (1, 4, 8) for g in (False, True)]
        results.sort(key=lambda r: order.index(tuple(r["case"][k] for k in ("vocab", "seq", "pairs", "gc")))
                     if tuple(r["case"][k] for k in ("vocab", "seq", "pairs", "gc")) in order else len(order))
        prep = prep or old.get("prep")
        commands = old.get("commands", []) + commands
    lines = [
        "# ORPO speed and memory: alignkit against TRL", "",
        "- command" + ("s (later ones reran some cases and replaced their rows)" if len(commands) > 1 else "") + ": "
        + "; ".join(f"`{c.strip()}`" for c in commands),
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine(args.device)}",
        f"- versions: {versions()}",
        f"- model: random Qwen2 architecture, shape `{args.size}` {SIZES[args.size]}, tied embeddings, "
        f"{'bf16' if args.device == 'cuda' else 'float32'}",
        f"- {args.steps} optimizer steps per run, the first {args.warmup} not timed; AdamW, constant lr 1e-4; "
        "identical rows truncated to exactly seq tokens a side",
        "- time and memory ratios are alignkit / TRL (lower is better); peak memory is the process's max RSS "
        "(CPU) or torch.cuda.max_memory_allocated (GPU)", "",
        *table(results), "", *extra,
    ]
    if prep:
        lines += ["## Preprocessing", "",
                  f"2000 distinct rows (prompts of 60 digits, answers of 128), max_length 512 (nothing truncated): "
                  f"alignkit {fmt(prep.get('alignkit_examples_per_s'), '.0f')} examples/s, "
                  f"TRL {fmt(prep.get('trl_examples_per_s'), '.0f')} examples/s "
                  f"(ratio {fmt(prep.get('alignkit_examples_per_s', 0) / prep.get('trl_examples_per_s', 1), '.1f')}x); "
                  f"same token ids: {prep.get('same_ids', prep.get('status'))}.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        Path(args.output).write_text(text + kept_sections(Path(args.output)))
        saved.write_text(json.dumps({"results": results, "prep": prep, "commands": commands}, indent=1))


if __name__ == "__main__":
    main()
