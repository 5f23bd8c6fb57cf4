"""Every figure the READMEs show about the shipped demo jobs, measured by one script and rendered from one file.

    python scripts/readme_figures.py              # run each demo job, write docs/figures.json, update the READMEs
    python scripts/readme_figures.py --timings    # the same, timing each job with /usr/bin/time -v (idle machine!)
    python scripts/readme_figures.py --suite      # only time the README's test command (lint + the whole suite)
    python scripts/readme_figures.py --render     # only re-render the READMEs from docs/figures.json
    python scripts/readme_figures.py --check      # exit 1 if a README differs from its rendering

Each demo job is `alignkit -q run --method NAME` in an empty folder, offline, with torch's default thread count
(OMP_NUM_THREADS unset, as CI runs). The held-out rows of its metrics.jsonl go to docs/figures.json with the
command, date, machine and thread count. The READMEs' figures live between `<!-- figures:BLOCK -->` and
`<!-- /figures -->` markers and are rendered from that file; tests/core/test_docs.py checks the READMEs equal the
rendering, and each demo-job test checks its run equals the file's figures (`assert_demo_matches`), so a change
that moves a figure fails the suite until this script is run again. Timings are kept from the last run that
measured them (`--timings`, `--suite`), each with its command and date.

The held-out figures are the same to the last decimals only on the same CPU model and thread count: another CPU's
kernels round differently, and a sampled or trained trajectory drifts from the first differing bit (an AMD EPYC and
an Intel Xeon part at step 0 of a sampling demo). So docs/figures.json keeps, beside the README's figures (its
`machine`), the figures of each other CPU they were made on (`elsewhere`: machine -> demo -> evals).
`assert_demo_matches` checks a run against its own CPU's figures: the README's on the README's machine, else that
machine's `elsewhere` record, else (a CPU no figures were made on) only the eval steps, with a warning. A full run
on another machine makes it the README's machine and keeps the previous machine's figures under `elsewhere`; a
re-run that moves a demo's figures on the README's machine (a code change) drops that demo's `elsewhere` records,
which the old code made.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
METHODS = ("orpo", "dpo", "cpo", "simpo", "sft", "kto", "grpo", "rloo", "distill", "reward", "online-dpo")
#: demos run from a shipped config rather than --method: name -> (config file, its train.output_dir[, the configs run
#: first in the same folder: the demo starts from their output]); their figures are under docs/figures.json's "configs"
CONFIG_DEMOS = {
    "grpo-tools": ("configs/grpo-tools-demo.yaml", "outputs/grpo-tools"),
    "sft-vlm": ("configs/sft-vlm-demo.yaml", "outputs/sft-vlm-demo"),
    "dpo-vlm": ("configs/dpo-vlm-demo.yaml", "outputs/dpo-vlm-demo", ("configs/sft-vlm-demo.yaml",)),
    "grpo-vlm": ("configs/grpo-vlm-demo.yaml", "outputs/grpo-vlm-demo", ("configs/grpo-vlm-warmup.yaml",)),
}
SUITE_COMMAND = "ruff check . && pytest -q"
#: relative and absolute tolerance of a demo job's metrics against the file's (the same thread count and CPU give
#: the same numbers; this leaves room for another CPU's instruction set, not for a change of the code)
TOLERANCE = 1e-3


def demo_command(method: str) -> list[str]:
    if method in CONFIG_DEMOS:
        return ["alignkit", "-q", "run", "-c", CONFIG_DEMOS[method][0]]
    return ["alignkit", "-q", "run", "--method", method]


def before(method: str) -> tuple[str, ...]:
    """The shipped configs a config demo starts from (run first, in the same folder)."""
    return CONFIG_DEMOS[method][2] if method in CONFIG_DEMOS and len(CONFIG_DEMOS[method]) > 2 else ()


def demo_text(method: str) -> str:
    """The demo's command line as a user types it (the configs it starts from first)."""
    return " && ".join([*(f"alignkit -q run -c {c}" for c in before(method)), " ".join(demo_command(method))])


def kind_of(name: str) -> str:
    """Where docs/figures.json keeps a demo: `configs` (a config demo) or `methods`."""
    return "configs" if name in CONFIG_DEMOS else "methods"


def entry(figures: dict, name: str) -> dict:
    """A demo's figures: a method's (`methods`) or a config demo's (`configs`)."""
    return figures[kind_of(name)][name]


def default_threads() -> int:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def load() -> dict:
    return json.loads(FIGURES.read_text())


def demo_env(env: dict | None = None, cache: Path | None = None) -> dict:
    """`env` (default os.environ) made to run a demo job exactly as the figures were made: offline, with the
    figures' thread count (a different one sums in another order and moves the later decimals) and, given
    `cache`, an empty cache folder there."""
    env = dict(os.environ if env is None else env)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(load()["threads"]),
               OMP_WAIT_POLICY="PASSIVE")  # idle threads sleep instead of spinning: the same sums, kinder to a busy CPU
    if cache is not None:  # GRPO's demo warm-up made with these threads, not taken from a run with other threads
        env["XDG_CACHE_HOME"] = str(cache)
    return env


def eval_rows(metrics_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in rows
            if any(k.startswith("eval_") for k in r)]


def figures_here(figures: dict, method: str, here: str) -> list[dict] | None:
    """The evals `method`'s demo gave on CPU `here` (the README's, or an `elsewhere` record); None if not made there."""
    if here == figures["machine"]:
        return entry(figures, method)["evals"]
    return figures.get("elsewhere", {}).get(here, {}).get(method)


def differences(expected: list[dict], got: list[dict]) -> str | None:
    """The first metric of `got` off `expected` by more than TOLERANCE (or a missing step or key), else None."""
    if [r["step"] for r in got] != [r["step"] for r in expected]:
        return f"eval steps {[r['step'] for r in got]} vs {[r['step'] for r in expected]}"
    for want, have in zip(expected, got):
        for key, value in want.items():
            if key not in have:
                return f"{key} missing at step {want['step']}"
            if abs(have[key] - value) > TOLERANCE * max(1.0, abs(value)):
                return f"step {want['step']} {key}: {have[key]} vs {value}"
    return None


def assert_demo_matches(method: str, metrics_file: Path) -> None:
    """The held-out rows of a demo job's metrics.jsonl equal the figures docs/figures.json has for `method` on this
    CPU, each metric within TOLERANCE (module docstring); on a CPU it has none for, the eval steps only, and a
    warning. The message says to re-run this script when the code changed them on purpose."""
    figures, here = load(), machine()
    got = eval_rows(metrics_file)
    expected = figures_here(figures, method, here)
    hint = f"the {method} demo no longer gives the README's figures: run `python scripts/readme_figures.py`"
    if expected is None:
        warnings.warn(f"no {method} demo figures were made on {here}: only its eval steps are checked "
                      f"(`python scripts/readme_figures.py --elsewhere {method}` records them)", stacklevel=2)
        expected = [{"step": r["step"]} for r in entry(figures, method)["evals"]]
    wrong = differences(expected, got)
    assert wrong is None, f"{hint} ({wrong})"


def parse_time_v(stderr: str) -> dict:
    def field(name):
        return re.search(rf"{re.escape(name)}: (.+)", stderr).group(1).strip()

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gb": round(int(field(
        "Maximum resident set size (kbytes)")) / 1024 ** 2, 2)}


def run_demo(method: str, timed: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("ALIGNKIT_LOAD_PLUGINS", None)
    if not timed:  # idle threads sleep instead of spinning (the same sums); timings measure the plain command
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    exe = str(Path(sys.executable).parent / "alignkit")
    with tempfile.TemporaryDirectory() as tmp:
        # an empty cache: GRPO's demo warm-up is made here, with this thread count, not taken from another run
        env["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        cmd = [exe, *demo_command(method)[1:]]
        if method in CONFIG_DEMOS:  # the shipped config, read from the checkout
            cmd[-1] = str(ROOT / CONFIG_DEMOS[method][0])
        if timed:
            cmd = ["/usr/bin/time", "-v", *cmd]
        start = time.time()
        for config in before(method):  # what the demo starts from, untimed
            first = subprocess.run([exe, "-q", "run", "-c", str(ROOT / config)], cwd=tmp, env=env, capture_output=True,
                                   text=True)
            if first.returncode != 0:
                sys.exit(f"{method}: {config}: exit {first.returncode}\n{first.stderr[-3000:]}")
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        print(f"{method}: {time.time() - start:.0f} s", file=sys.stderr)
        out = CONFIG_DEMOS[method][1] if method in CONFIG_DEMOS else f"outputs/{method}"
        result = {"command": demo_text(method), "evals": eval_rows(Path(tmp) / out / "metrics.jsonl")}
        if timed:
            result["timing"] = {"command": "/usr/bin/time -v " + result["command"], "machine": machine(),
                                "note": "nothing cached", **parse_time_v(proc.stderr)}  # GRPO: warm-up included
        return result


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"a {os.cpu_count()}-core {model} CPU"


def record_elsewhere(methods) -> dict:
    """Run `methods`' demos here (another CPU than the README's, its thread count) and keep their evals as this
    CPU's `elsewhere` record; the README's figures stay."""
    figures, here = load(), machine()
    if here == figures["machine"]:
        sys.exit(f"this is the README figures' machine ({here}): run without --elsewhere")
    record = figures.setdefault("elsewhere", {}).setdefault(here, {})
    for method in methods:
        record[method] = run_demo(method, False)["evals"]
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def measure(methods, timings: bool) -> dict:
    old = load() if FIGURES.exists() else {"methods": {}}
    figures = {**old, "machine": machine(), "threads": default_threads(), "methods": dict(old["methods"]),
               "configs": dict(old.get("configs", {})), "elsewhere": dict(old.get("elsewhere", {}))}
    same_machine = (old.get("threads"), old.get("machine")) == (figures["threads"], figures["machine"])
    if set(methods) != set(METHODS) | set(CONFIG_DEMOS) and not same_machine:
        sys.exit(f"another machine or thread count than docs/figures.json's: run every demo ({' '.join(METHODS)}), "
                 f"or record this CPU's figures beside the README's with --elsewhere")
    if not same_machine and "machine" in old:  # the previous README machine's figures stay checkable there
        kept = {m: entry(old, m)["evals"] for m in (*METHODS, *CONFIG_DEMOS) if m in old.get(kind_of(m), {})}
        figures["elsewhere"][old["machine"]] = {**figures["elsewhere"].get(old["machine"], {}), **kept}
        figures["elsewhere"].pop(figures["machine"], None)  # this machine's figures are the README's now
    for method in methods:
        result = run_demo(method, timings)
        result["date"] = datetime.date.today().isoformat()
        kind = kind_of(method)
        before = old.get(kind, {}).get(method)
        if same_machine and before and differences(before["evals"], result["evals"]):
            for record in figures["elsewhere"].values():  # made by the code that gave the old figures
                if record.pop(method, None) is not None:
                    print(f"{method}: its figures moved; dropped the other CPUs' records of it", file=sys.stderr)
        if not timings and "timing" in figures[kind].get(method, {}):
            result["timing"] = figures[kind][method]["timing"]  # kept, with the date it was measured
        elif timings:
            result["timing"]["date"] = result["date"]
        figures[kind][method] = result
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")  # after each job: a long run keeps what it made
    return figures


def time_suite() -> dict:
    today = datetime.date.today().isoformat()
    start = time.time()
    proc = subprocess.run(SUITE_COMMAND, shell=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:])
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    return {"command": SUITE_COMMAND, "date": today, "machine": machine(), "tests": passed,
            "wall_min": round(wall / 60, 1)}


# ---------------------------------------------------------------------------------------------------- rendering

def at(figures: dict, method: str, step: int) -> dict:
    return next(r for r in entry(figures, method)["evals"] if r["step"] == step)


def steps(figures: dict, method: str) -> list[int]:
    return [r["step"] for r in entry(figures, method)["evals"]]


def fmt(key: str, value: float) -> str:
    return f"{int(value):,}" if key.endswith("num_tokens") else f"{value:.3f}"  # counts, and 3 decimals


def table(figures: dict, method: str, metrics: list[tuple[str, str]]) -> str:
    """Held-out metrics (rows) at the demo's eval steps (columns)."""
    columns = steps(figures, method)
    lines = ["| step | " + " | ".join(str(s) for s in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, label in metrics:
        lines.append(f"| {label} | " + " | ".join(fmt(key, at(figures, method, s)[key]) for s in columns) + " |")
    return "\n".join(lines)


def made_by(figures: dict, method: str) -> str:
    e = entry(figures, method)
    return (f"Made by `python scripts/readme_figures.py` ({e['date']}, {figures['machine']}, "
            f"{figures['threads']} threads) from `{e['command']}`.")


def timing(figures: dict, method: str) -> str:
    t = entry(figures, method).get("timing")
    if t is None:
        return "Not timed yet: `python scripts/readme_figures.py --timings` on an idle machine measures it."
    cpu = f"{t['cpu_s']:g} s of CPU time, " if "cpu_s" in t else ""
    what = f" ({t['note']})" if "note" in t else ""
    return (f"Measured {t['date']} with `{t['command']}`{what} on {t['machine']}, otherwise idle: "
            f"{t['wall_s']:g} s wall, {cpu}{t['peak_rss_gb']:g} GB peak RSS.")


PAIRWISE = [("eval_loss", "`eval_loss`"), ("eval_rewards/accuracies", "`eval_rewards/accuracies`"),
            ("eval_rewards/margins", "`eval_rewards/margins`")]


def pairwise(method: str):
    def render(f):
        return f"{table(f, method, PAIRWISE)}\n\n{made_by(f, method)} {timing(f, method)}"
    return render


def sft_line(f):
    last = f["methods"]["sft"]["evals"][-1]
    return ("```bash\nalignkit run --method simpo        # after pip install -e plugins/alignkit-simpo\n"
            "alignkit run --method sft          # builtin:sort-sft; held-out eval_mean_token_accuracy "
            f"{last['eval_mean_token_accuracy']:.2f} after {last['step']} steps\n```")


def sft(f):
    metrics = [("eval_loss", "`eval_loss`"), ("eval_mean_token_accuracy", "`eval_mean_token_accuracy`"),
               ("eval_num_tokens", "`eval_num_tokens`")]
    return f"{table(f, 'sft', metrics)}\n\n{made_by(f, 'sft')} {timing(f, 'sft')}"


def kto(f):
    metrics = [("eval_loss", "`eval_loss`"), ("eval_rewards/margins", "`eval_rewards/margins`"),
               ("eval_kl", "`eval_kl`"), ("eval_num_tokens", "`eval_num_tokens`")]
    return f"{table(f, 'kto', metrics)}\n\n{made_by(f, 'kto')} {timing(f, 'kto')}"


def grpo(f):
    metrics = [("eval_reward", "`eval_reward` (sum of both rewards, max 2)"),
               ("eval_rewards/exact-match/mean", "`eval_rewards/exact-match/mean`"),
               ("eval_rewards/sort-order/mean", "`eval_rewards/sort-order/mean`")]
    return f"{table(f, 'grpo', metrics)}\n\n{made_by(f, 'grpo')} {timing(f, 'grpo')}"


def rloo(f):
    metrics = [("eval_reward", "`eval_reward` (exact-match, max 1)")]
    return f"{table(f, 'rloo', metrics)}\n\n{made_by(f, 'rloo')} {timing(f, 'rloo')}"


def online_dpo(f):
    metrics = [("eval_reward", "`eval_reward` (held-out mean exact-match)"), ("eval_loss", "`eval_loss`"),
               ("eval_objective/kl", "`eval_objective/kl`")]
    return f"{table(f, 'online-dpo', metrics)}\n\n{made_by(f, 'online-dpo')} {timing(f, 'online-dpo')}"


def grpo_tools(f):
    metrics = [("eval_reward", "`eval_reward` (exact-match + 0.5 for a tool call that ran)"),
               ("eval_rewards/exact-match/mean", "`eval_rewards/exact-match/mean` (the answer uses the result)"),
               ("eval_episodes/tool_used/mean", "well-formed tool call (share of episodes)"),
               ("eval_episodes/turns/mean", "turns per episode")]
    return f"{table(f, 'grpo-tools', metrics)}\n\n{made_by(f, 'grpo-tools')} {timing(f, 'grpo-tools')}"


def distill(f):
    metrics = [("eval_kl_teacher_student", "`eval_kl_teacher_student`"),
               ("eval_token_agreement", "`eval_token_agreement`")]
    return f"{table(f, 'distill', metrics)}\n\n{made_by(f, 'distill')} {timing(f, 'distill')}"


def reward(f):
    metrics = [("eval_loss", "`eval_loss`"), ("eval_accuracy", "`eval_accuracy` (pairs ranked right)"),
               ("eval_margin", "`eval_margin`")]
    return f"{table(f, 'reward', metrics)}\n\n{made_by(f, 'reward')} {timing(f, 'reward')}"


#: the vision-language demos: (demo, what it trains, its held-out metric, label)
VLM = [("sft-vlm", "SFT, 6 epochs of the shapes questions", "eval_mean_token_accuracy", "`eval_mean_token_accuracy`"),
       ("dpo-vlm", "DPO from the SFT demo's model, 1 epoch", "eval_rewards/accuracies", "`eval_rewards/accuracies`"),
       ("grpo-vlm", "GRPO (exact-match) after a 60-step SFT warm-up", "eval_reward", "`eval_reward` (exact-match)")]


def vlm(f):
    """Each vision-language demo's held-out metric at its first and last evaluation, and how it was made."""
    lines = ["| demo | held-out metric | first eval | last eval |", "|---|---|---|---|"]
    for name, what, key, label in VLM:
        first, last = entry(f, name)["evals"][0], entry(f, name)["evals"][-1]
        lines.append(f"| {what} | {label} | {first[key]:.3f} (step {first['step']}) | "
                     f"{last[key]:.3f} (step {last['step']}) |")
    made = "; ".join(f"`{entry(f, name)['command']}` ({entry(f, name)['date']})" for name, *_ in VLM)
    return "\n".join(lines) + (f"\n\nMade by `python scripts/readme_figures.py sft-vlm dpo-vlm grpo-vlm` on "
                                f"{f['machine']}, {f['threads']} threads, from {made}.")


def suite(f):
    s = f.get("suite")
    if s is None:
        return "Run the tests (lint and the whole suite; `python scripts/readme_figures.py --suite` times them):"
    return (f"Run the tests (lint and the whole suite: {s['tests']} tests, {s['wall_min']:g} min on {s['machine']}, "
            f"otherwise idle, measured {s['date']}; `python scripts/readme_figures.py --suite` measures it again):")


#: README file -> block name -> renderer
BLOCKS = {
    "README.md": {"orpo": pairwise("orpo"), "sft-line": sft_line, "grpo": grpo, "grpo-tools": grpo_tools,
                  "vlm": vlm, "suite": suite},
    "plugins/alignkit-dpo/README.md": {"dpo": pairwise("dpo"), "online-dpo": online_dpo},
    "plugins/alignkit-cpo/README.md": {"cpo": pairwise("cpo")},
    "plugins/alignkit-simpo/README.md": {"simpo": pairwise("simpo")},
    "plugins/alignkit-sft/README.md": {"sft": sft},
    "plugins/alignkit-kto/README.md": {"kto": kto},
    "plugins/alignkit-grpo/README.md": {"grpo": grpo},
    "plugins/alignkit-rloo/README.md": {"rloo": rloo},
    "plugins/alignkit-distill/README.md": {"distill": distill},
    "plugins/alignkit-reward/README.md": {"reward": reward},
    "plugins/alignkit-trl/README.md": {},  # no method, no demo: listed so no figure is written there by hand
}
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)


def render(text: str, blocks: dict, figures: dict) -> str:
    found = [m["name"] for m in BLOCK.finditer(text)]
    if sorted(found) != sorted(blocks):
        raise ValueError(f"figure blocks {found}, expected {sorted(blocks)}")
    return BLOCK.sub(lambda m: m[1] + blocks[m["name"]](figures) + "\n" + m[4], text)


def rendered(figures: dict) -> dict[str, tuple[str, str]]:
    """README path -> (its text now, its text rendered from `figures`)."""
    out = {}
    for name, blocks in BLOCKS.items():
        text = (ROOT / name).read_text()
        out[name] = (text, render(text, blocks, figures))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", default=[*METHODS, *CONFIG_DEMOS],
                        help=f"demo jobs to run: methods, or the config demos {', '.join(CONFIG_DEMOS)} (default: all)")
    parser.add_argument("--timings", action="store_true", help="time each job (only on an idle machine)")
    parser.add_argument("--elsewhere", action="store_true",
                        help="on another CPU than the README's: record these demos' figures for this CPU's checks")
    parser.add_argument("--suite", action="store_true", help="only time the README's test command (idle machine!)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--render", action="store_true", help="only re-render the READMEs from docs/figures.json")
    mode.add_argument("--check", action="store_true", help="exit 1 if a README differs from its rendering")
    args = parser.parse_args()
    if args.check:
        stale = [name for name, (now, new) in rendered(load()).items() if now != new]
        sys.exit(f"stale: {', '.join(stale)}" if stale else 0)
    if args.suite:
        FIGURES.write_text(json.dumps({**load(), "suite": time_suite()}, indent=1) + "\n")
    elif args.elsewhere:
        record_elsewhere(args.methods)
    elif not args.render:
        FIGURES.write_text(json.dumps(measure(args.methods, args.timings), indent=1) + "\n")
    for name, (now, new) in rendered(load()).items():
        if now != new:
            (ROOT / name).write_text(new)
            print(f"updated {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
