"""Every offline method, alignkit against TRL 1.16's own trainer (with its fused LM head), same model and rows.

    pip install -e ".[bench]" -e plugins/alignkit-sft -e plugins/alignkit-dpo -e plugins/alignkit-kto \
        -e plugins/alignkit-reward -e plugins/alignkit-distill
    OMP_NUM_THREADS=2 python benchmarks/methods_vs_trl.py                        # the matrix -> methods-vs-trl.md
    python benchmarks/methods_vs_trl.py --methods sft --vocab 151936 --seq 512 --no-write

Each (method, library, case) trains in its own process on a random Qwen2-architecture model of shape `small`
(orpo_speed.py: same seed, same weights on both sides; the reward model is the same body with a one-label score
head; the distillation teacher another random model of the same shape) and the same multi-turn rows
(bench_data.dialogue_rows: 2-5 turn prompts over half the tokens, answers of unequal length). A step sees one
batch that is the whole dataset, so both libraries' step-1 losses must agree whatever their sampling order:
`pairs` preference rows for DPO and reward; their 2 x pairs answers as prompt-completion rows for SFT and
distillation, and as desirable / undesirable rows for KTO. Reported: seconds per optimizer step (median after the
first step), peak RSS of the process, the first losses of both. TRL: SFTTrainer, DPOTrainer, KTOTrainer and
RewardTrainer (all four on its fused LM head, `trl.trainer.utils.add_fused_lm_head`) and the GKDTrainer
(trl.experimental.gkd; lmbda 0: the data's completions only, as alignkit's distill with lmbda 0).
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from orpo_speed import SIZES, build, machine, summary, versions
from orpo_speed import run_worker as _run

HERE = Path(__file__).parent
METHODS = ("sft", "dpo", "kto", "reward", "distill", "grpo", "rloo")
ONLINE = ("grpo", "rloo")  # fixed completions: each pair's chosen and rejected answers are its prompt's 2 samples
LR = 1e-4


# ---- the rows each method trains on ---------------------------------------------------------------------

def method_rows(method: str, case: dict) -> list[dict]:
    from bench_data import dialogue_rows

    from alignkit.testing import tiny_tokenizer

    pairs = dialogue_rows(case["pairs"], case["seq"], tiny_tokenizer(), seed=0)
    if method in ("dpo", "reward"):
        return pairs
    if method in ONLINE:
        return [{"prompt": r["prompt"]} for r in pairs]
    if method == "kto":
        return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in pairs for side in ("chosen", "rejected")]
    return [{"prompt": r["prompt"], "completion": r[side]} for r in pairs for side in ("chosen", "rejected")]


def save_models(case: dict, folder: Path) -> None:
    """The policy (or classifier) and, for distillation, the teacher, saved once so both libraries load the same."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model, tok = build(case)
    if case["method"] == "reward":
        model.config.num_labels, model.config.pad_token_id = 1, tok.pad_token_id
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(model.config, dtype=torch.float32)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    if case["method"] == "distill":
        torch.manual_seed(1)
        teacher, _ = build({**case})
        for p in teacher.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
        teacher.save_pretrained(folder / "teacher")


# ---- the online methods' loss side: fixed completions on both sides ---------------------------------------

def fixed_completions(case: dict, tok) -> dict[tuple, list[list[int]]]:
    """The chat-templated prompt's ids -> its completions' ids: the pair's chosen and rejected answers + EOS, or
    (`completion_tokens`) `generations` answers of that many tokens. Both libraries' sampling is replaced by these,
    so the step is the rest (scoring, log-probs, loss, backward)."""
    import random

    from bench_data import dialogue_rows, text_of

    out, rng = {}, random.Random(1)
    n, length = case.get("generations", 2), case.get("completion_tokens")
    for r in dialogue_rows(case["pairs"], case["seq"], tok, seed=0):
        ids = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        if length:  # n answers of exactly `length` tokens, cut there (no EOS)
            out[tuple(ids)] = [tok(text_of(rng, tok, length), add_special_tokens=False)["input_ids"][:length]
                               for _ in range(n)]
        else:
            out[tuple(ids)] = [tok(r[side][0]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                               for side in ("chosen", "rejected")]
    return out


def vowel_reward(prompts, completions, **kwargs) -> list[float]:
    """Vowels / 100: samples of one prompt score differently, so each gets an advantage."""
    return [sum(ch in "aeiou" for ch in (c if isinstance(c, str) else c[-1]["content"])) / 100 for c in completions]


def _lookup(table: dict, ids) -> list[list[int]]:
    key = tuple(int(t) for t in ids)
    if key not in table:
        raise KeyError(f"a prompt of {len(key)} tokens that the fixed completions do not know")
    return table[key]


def online_config(case: dict) -> dict:
    common = {"num_generations": case.get("generations", 2), "temperature": 1.0,
              "max_completion_length": case.get("completion_tokens") or case["seq"]}
    return {**common, "loss_type": "dapo", "beta": 0.0} if case["method"] == "grpo" else {**common, "beta": 0.05}


# ---- the workers --------------------------------------------------------------------------------------------

def alignkit_worker(case: dict) -> dict:
    import datasets

    import alignkit
    from alignkit import hookimpl

    ends, losses = [], []

    class Timer:
        alignkit_all_runs = True

        @hookimpl
        def on_train_start(self, run):
            ends.append(time.perf_counter())

        @hookimpl
        def on_step_end(self, run, step, metrics):
            ends.append(time.perf_counter())
            losses.append(metrics["loss"])

    folder, method = Path(case["folder"]), case["method"]
    method_cfg = {"max_length": case["seq"]}
    plugins = [Timer()]
    if method == "distill":
        method_cfg.update(lmbda=0.0, seq_kd=False, beta=0.5)
    if method in ONLINE:
        from transformers import AutoTokenizer

        from alignkit.online import generation

        table = fixed_completions(case, AutoTokenizer.from_pretrained(folder / "model"))
        generation.TransformersBackend.generate = lambda self, prompt_ids, n, *a, **k: [
            _lookup(table, p)[:n] for p in prompt_ids]

        class Reward:
            @hookimpl
            def register_rewards(self, register):
                register("bench-vowels", vowel_reward)

        plugins.append(Reward())
        method_cfg = {**online_config(case), "reward_funcs": ["bench-vowels"], "sft_warmup_steps": 0}
    method_cfg.update(case.get("method_options") or {})
    model_cfg = {"name_or_path": str(folder / "model")}
    if method == "distill":
        model_cfg["ref_name_or_path"] = str(folder / "teacher")
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model": model_cfg, "method": method_cfg,
            "train": {"output_dir": out, "max_steps": case["steps"], "per_device_train_batch_size": case["batch"],
                      "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                      "logging_steps": 1, "save_steps": None, "eval_steps": None, "eval_on_start": False,
                      "disable_tqdm": True, "gradient_checkpointing": case["gc"], "plots": False, "seed": 0,
                      "optim": case.get("optim", "adamw_torch")},
        }
        ds = datasets.Dataset.from_list(method_rows(method, case))
        accumulate = case.get("accumulate", 1)
        config["train"]["per_device_train_batch_size"] = (case["pairs"] // accumulate if method in ONLINE
                                                          else case["batch"])
        config["train"]["gradient_accumulation_steps"] = accumulate
        # the evaluation alignkit always runs at the end (outside the timed steps; TRL's side runs none) in batches
        # of the training micro-batch, so its forward is no larger than a training one and the peak is training's
        config["train"]["per_device_eval_batch_size"] = config["train"]["per_device_train_batch_size"]
        # the online methods evaluate on the same prompts (the default eval set, the demo's, has prompts the fixed
        # completions do not know)
        extra = {"eval_dataset": ds} if method in ONLINE else {}
        alignkit.run(method, config, plugins=alignkit.get_plugin_manager(plugins), train_dataset=ds, **extra)
    return summary(case, ends, losses)


def trl_worker(case: dict) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    ends, losses = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    folder, method = Path(case["folder"]), case["method"]
    accumulate = case.get("accumulate", 1)
    batch = case["pairs"] * case.get("generations", 2) // accumulate if method in ONLINE else case["batch"]
    common = dict(max_steps=case["steps"], per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                  learning_rate=LR, optim=case.get("optim", "adamw_torch"),
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                  gradient_checkpointing=case["gc"], bf16=False, use_cpu=True, seed=0, max_length=case["seq"])
    tok = AutoTokenizer.from_pretrained(folder / "model")
    rows = method_rows(method, case)
    if method == "distill":  # GKDTrainer reads conversations; its collator trains the last assistant turn
        rows = [{"messages": r["prompt"] + r["completion"]} for r in rows]
    ds = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as out:
        if method == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(folder / "model")
        else:
            model = AutoModelForCausalLM.from_pretrained(folder / "model")
        kwargs = dict(model=model, processing_class=tok, train_dataset=ds, callbacks=[Timer()])
        if method in ONLINE:
            name = {"grpo": "GRPO", "rloo": "RLOO"}[method]
            trainer_cls = getattr(trl, f"{name}Trainer")
            table = fixed_completions(case, tok)

            def fixed(self, prompt_ids, *a, **k):  # each prompt comes num_generations times in a row
                seen, out = {}, []
                for p in prompt_ids:
                    i = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
                    out.append(_lookup(table, p)[i])
                return (out, None) if method == "grpo" else out

            trainer_cls._generate_single_turn = fixed
            vowel_reward.__name__ = "bench-vowels"
            common.pop("max_length")
            args = getattr(trl, f"{name}Config")(output_dir=out, **common, **online_config(case),
                                                 disable_dropout=True)
            trainer = trainer_cls(reward_funcs=[vowel_reward], args=args, **kwargs)
        elif method == "distill":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(output_dir=out, lmbda=0.0, seq_kd=False, beta=0.5, **common)
            trainer = GKDTrainer(teacher_model=AutoModelForCausalLM.from_pretrained(folder / "teacher"), args=args,
                                 **kwargs)
        else:
            name = {"sft": "SFT", "dpo": "DPO", "kto": "KTO", "reward": "Reward"}[method]
            args = getattr(trl, f"{name}Config")(output_dir=out, **common)
            trainer = getattr(trl, f"{name}Trainer")(args=args, **kwargs)
        trainer.train()
    return summary(case, ends, losses)


WORKERS = {"alignkit": alignkit_worker, "trl": trl_worker}


def run_worker(lib: str, case: dict, mem_limit_gb: float, timeout_s: float) -> dict:
    return _run(lib, case, mem_limit_gb, timeout_s, script=__file__)


# ---- the driver -------------------------------------------------------------------------------------------

def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | vocab | seq | rows/step | s/step alignkit | s/step TRL | time ratio | peak MB alignkit | "
             "peak MB TRL | memory ratio | losses alignkit | losses TRL | targets (time 0.7x, memory 0.8x) |",
             "|" + "---|" * 13]
    for r in rows:
        c, a, t = r["case"], r["alignkit"], r["trl"]
        ok = a.get("status") == "ok" and t.get("status") == "ok"
        tr = a["step_s"] / t["step_s"] if ok else None
        mr = a["peak_mb"] / t["peak_mb"] if ok else None

        def side(x, key, spec):
            return fmt(x.get(key), spec) if x.get("status") == "ok" else x.get("status", "-")

        def losses(x):
            return " ".join(f"{v:.4f}" for v in x["losses"]) if x.get("status") == "ok" else "-"

        verdicts = {(True, True): "met", (True, False): "time met, memory not",
                    (False, True): "memory met, time not", (False, False): "neither"}
        met = verdicts[tr <= 0.7, mr <= 0.8] if ok else "-"
        lines.append(f"| {c['method']} | {c['vocab']} | {c['seq']} | {c['batch']} | {side(a, 'step_s', '.3f')} | "
                     f"{side(t, 'step_s', '.3f')} | {fmt(tr, '.2f')} | {side(a, 'peak_mb', '.0f')} | "
                     f"{side(t, 'peak_mb', '.0f')} | {fmt(mr, '.2f')} | {losses(a)} | {losses(t)} | {met} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x as many single rows)")
    p.add_argument("--size", choices=SIZES, default="small", help="model shape (orpo_speed.SIZES)")
    p.add_argument("--layers", type=int, help="that shape with this many layers")
    p.add_argument("--generations", type=int, default=2, help="grpo, rloo: samples per prompt")
    p.add_argument("--completion-tokens", type=int, help="grpo, rloo: every sample this long (else the pair's answers)")
    p.add_argument("--accumulate", type=int, default=1, help="grpo, rloo: micro-batches per step (of the prompts)")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--optim", default="adamw_torch_fused",
                   help="train.optim / TrainingArguments.optim on both sides (default: both libraries' default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="alignkit method options (YAML values), e.g. share_prompt=false to profile a path")
    p.add_argument("--mem-limit-gb", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--note", default="", help="a line about the machine's load")
    p.add_argument("--output", default=str(HERE / "methods-vs-trl.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.case))), flush=True)
        return
    import yaml

    options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for vocab in args.vocab:
                for seq in args.seq:
                    folder = Path(tmp, f"{method}-{vocab}-{seq}")
                    case = dict(method=method, vocab=vocab, seq=seq, pairs=args.pairs, gc=args.gc, steps=args.steps,
                                optim=args.optim, warmup=1, size=args.size, layers=args.layers,
                                generations=args.generations,
                                completion_tokens=args.completion_tokens, accumulate=args.accumulate,
                                device="cpu", folder=str(folder), method_options=options,
                                batch=args.pairs if method in ("dpo", "reward") else 2 * args.pairs)
                    # grpo, rloo: TRL's batch counts completions (2 per prompt), alignkit's prompts
                    save_models(case, folder)
                    row = {"case": case}
                    for lib in ("alignkit", "trl"):
                        row[lib] = run_worker(lib, case, args.mem_limit_gb, args.timeout)
                    rows.append(row)
                    print(table([row])[-1], flush=True)
    lines = ["# Every method: alignkit against TRL 1.16's trainers", "",
             f"- command: `python benchmarks/methods_vs_trl.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine('cpu')}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
             + (f"; {args.note}" if args.note else ""),
             f"- versions: {versions()}",
             f"- model: random Qwen2, shape `{args.size}` {SIZES[args.size]}"
             + (f" with {args.layers} layers" if args.layers else "") + ", tied embeddings, float32; gradient "
             f"checkpointing {'on' if args.gc else 'off'} on both sides; optimizer {args.optim} on both sides, "
             f"constant lr {LR:g}",
             f"- {args.steps} steps per run, the first not timed; one batch = the whole dataset ({args.pairs} "
             "multi-turn pairs), so step-1 losses must agree; ratios are alignkit / TRL (lower is better)", "",
             *table(rows), ""]
    print("\n".join(lines))
    if not args.no_write:
        Path(args.output).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
