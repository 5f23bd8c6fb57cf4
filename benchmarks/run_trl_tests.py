"""Run TRL's own trainer test files against alignkit_trl, offline, one trainer at a time.

    python benchmarks/run_trl_tests.py --trainer sft [--trainer dpo ...] [--source DIR|TARBALL] [--keep DIR]
                                       [--against trl] [-- PYTEST_ARGS]

1. Takes tests/test_<trainer>_trainer.py (with TRL's tests/testing_utils.py, conftest.py and data/) from `--source`:
   a TRL source tree or its GitHub archive (.tar.gz). Default: downloads the GitHub archive of tag v1.16.0 (TRL's
   sdist on PyPI has no tests). Nothing of it is ever committed here.
2. Changes only import lines (`from trl import ...` -> `from alignkit_trl import ...`; TRL's internal helpers such
   as its data collators still come from the installed trl, and an `is_X_available` the installed trl lacks becomes
   an importability check of X) and Hub fixture ids (to offline stand-ins built here: a tiny
   Qwen2 causal LM and sequence classifier with their tokenizer, every `trl-internal-testing/zen` config the
   files read, and `zen-image`'s conversational configs with a small picture per row); every test and assertion
   is kept as written.
3. Collects the tests, excludes those in EXCLUSIONS (each with its reason: Liger, GPU-only, a fixture with
   no offline stand-in (e.g. the vision tests' hub vision-language models), tests of TRL's own collator classes,
   ...), runs the rest with pytest and prints, per trainer,
   TRL's test count, passed, failed and the exclusions by reason. Results: benchmarks/trl-tests.md.

`--against trl` leaves the imports alone (the same offline files run on TRL itself, to check the stand-ins).
"""

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "v1.16.0"
ARCHIVE = f"https://github.com/huggingface/trl/archive/refs/tags/{TAG}.tar.gz"
TRAINERS = ("sft", "dpo", "kto", "grpo", "rloo", "reward")
SUPPORT = ("__init__.py", "conftest.py", "testing_utils.py", "testing_constants.py")

#: Hub id -> stand-in folder name (built by build_fixtures)
FIXTURES = {
    "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": "qwen2",
    "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5": "qwen2-cls",
    "trl-internal-testing/zen": "zen",
    "trl-internal-testing/zen-image": "zen-image",
}

#: (what a test's class, name or source matches, the reason it is not run); the first match wins
EXCLUSIONS: list[tuple[str, str]] = [
    (r"class:.*DataCollator", "tests TRL's own data collator class, not the trainer"),
    (r"class:.*Slow\b", "TRL's slow suite (large models on an accelerator)"),
    (r"(?i)liger", "Liger kernels: not supported by alignkit (its chunked loss fills that role)"),
    (r"require_torch_accelerator|require_torch_multi_accelerator|require_torch_gpu|torch_device ?== ?\"cuda\"",
     "GPU-only"),
    (r"(?i)bitsandbytes|load_in_4bit|load_in_8bit|BitsAndBytesConfig|quantization_config",
     "bitsandbytes quantization (GPU-only)"),
    (r"(?i)vllm", "vLLM: needs a GPU and a vLLM server"),
    (r"(?i)tool|environment_factory|harmony", "tool calling / environments: not supported by alignkit"),
    (r"(?i)rollout_func", "custom rollout functions: not supported by alignkit"),
    (r"(?i)kernels-community|use_kernels|flash", "hub kernels / flash attention: GPU-only"),
    (r"::test_eval_packing\b|::test_only_train_packing\b",
     "asserts the packed row count of the hub zen data with the hub tokenizer (3 rows); the offline stand-ins "
     "pack into 5 rows, with TRL's own pack_dataset too (the other assertions pass)"),
    (r"test_(sft|kto|dpo|reward)_trainer\.py::\w+::test_train_model_dtype\b",
     "trains float16 weights at learning_rate 0.1, which diverges: under TRL too the gradient norm turns inf/nan "
     "within 7 steps and the weights end NaN (the test checks only that they changed); alignkit refuses a non-finite "
     "step rather than write it into the weights (train.skip_nonfinite_steps skips such steps)"),
    (r"test_(grpo|rloo)_trainer\.py::\w+::test_train_with_mask_truncated_completions\b",
     "its fake generate returns the hub Qwen2 tokenizer's ids (EOS 151645, pad 151643), outside the offline "
     "stand-in's vocabulary (fails on TRL itself here)"),
    (r"test_(grpo|rloo)_trainer\.py::\w+::test_train_with_mask_truncated_completions_all_masked",
     "relies on the hub model's 151k-token vocabulary never sampling EOS in 8 tokens; the offline stand-in's small "
     "vocabulary does (fails on TRL itself here)"),
    (r"test_(grpo|rloo)_trainer\.py::\w+::test_train_with_(additional_)?generation_kwargs",
     "sampling options alignkit's rollout lacks (min_p, generation_kwargs such as beam search): they change the "
     "completions trained on"),
    (r"test_(grpo|rloo)_trainer\.py::\w+::test_prepare_input_called_with_correct_data",
     "steps_per_generation (one generation batch reused over several optimizer steps): not supported by alignkit "
     "(one rollout per optimizer step); it changes the trained weights"),
    (r"test_grpo_trainer\.py::\w+::test_entropy_bonus_scale\[luspo\]",
     "the entropy bonus with loss_type luspo (a sequence-level objective): alignkit takes the bonus's gradient on its "
     "fused head, which needs a token-local objective, and refuses the pair"),
    (r"test_grpo_trainer\.py::\w+::test_entropy_bonus_flows_gradients",
     "tests TRL's private _get_per_token_logps_and_entropies / _entropy_bonus_enabled, not the trainer (alignkit's "
     "entropy bonus trains with its gradient: test_train_with_static_entropy)"),
]
NO_STANDIN = "uses a hub model or dataset without an offline stand-in here: "
HUB_NAME = r"(?:trl-internal-testing|Qwen|google|meta-llama|HuggingFaceTB|kernels-community)/[\w.-]+"
HUB_ID = re.compile(rf"\"({HUB_NAME})\"")


# ---- the source ---------------------------------------------------------------------------------------------------

def fetch_source(source: str | None, work: Path) -> Path:
    """The tests/ folder of a TRL source tree, an archive of one, or (no source) the GitHub archive of TAG."""
    if source is None:
        archive = work / f"trl-{TAG}.tar.gz"
        print(f"downloading {ARCHIVE}", file=sys.stderr)
        urllib.request.urlretrieve(ARCHIVE, archive)
        source = str(archive)
    path = Path(source)
    if path.is_dir():
        return path / "tests"
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if ("/tests/" in m.name or m.name.endswith("/VERSION"))
                   and ".." not in m.name]
        tar.extractall(work / "src", members=members, filter="data")
    (tests,) = [p for p in (work / "src").glob("*/tests") if p.is_dir()]
    return tests


def source_version(tests: Path) -> str:
    version = tests.parent / "VERSION"
    return version.read_text().strip() if version.is_file() else "unknown (no VERSION file)"


# ---- offline stand-ins ----------------------------------------------------------------------------------------------

def zen_configs() -> dict[str, list[dict]]:
    """Every zen config TRL's trainer tests read, from the Zen of Python (the ORPO stand-ins' preference rows)."""
    sys.path.insert(0, str(HERE))
    from trl_standins import preference_rows, zen_lines

    rows = preference_rows()
    pairs = rows["standard_preference"]
    lines = zen_lines()

    def user(text):
        return {"role": "user", "content": text}

    def assistant(text):
        return {"role": "assistant", "content": text.strip()}

    unpaired = [r for p in pairs for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                           {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    return {
        **rows,
        "standard_language_modeling": [{"text": line} for line in lines],
        "conversational_language_modeling": [{"messages": [user(p["prompt"]), assistant(p["chosen"])]} for p in pairs],
        "standard_prompt_only": [{"prompt": p["prompt"]} for p in pairs],
        "conversational_prompt_only": [{"prompt": [user(p["prompt"])]} for p in pairs],
        "standard_prompt_completion": [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs],
        "conversational_prompt_completion": [{"prompt": [user(p["prompt"])], "completion": [assistant(p["chosen"])]}
                                             for p in pairs],
        "standard_unpaired_preference": unpaired,
        "conversational_unpaired_preference": [{"prompt": [user(r["prompt"])], "completion": [assistant(
            r["completion"])], "label": r["label"]} for r in unpaired],
    }


def write_configs(out: Path, configs: dict) -> Path:
    """A hub-style dataset folder: each config (name -> datasets.Dataset) split into train and the last 2 rows as
    test, written as parquet, and the README's `configs:` block that `load_dataset(out, name)` reads."""
    readme = ["---", "configs:"]
    for name, ds in configs.items():
        split = ds.train_test_split(test_size=2, seed=0, shuffle=False)
        readme += [f"- config_name: {name}", "  data_files:"]
        for part in ("train", "test"):
            (out / name).mkdir(parents=True, exist_ok=True)
            split[part].to_parquet(str(out / name / f"{part}.parquet"))
            readme += [f"  - split: {part}", f"    path: {name}/{part}.parquet"]
    (out / "README.md").write_text("\n".join(readme + ["---", ""]))
    return out


def build_zen(out: Path) -> Path:
    import datasets

    return write_configs(out, {name: datasets.Dataset.from_list(rows) for name, rows in zen_configs().items()})


def build_zen_image(out: Path) -> Path:
    """The zen-image configs TRL's tests read: the zen conversational rows, each with one small picture (`images`)."""
    import datasets
    from PIL import Image

    def pictured(rows):
        return datasets.Dataset.from_list([{**row, "images": [Image.new("RGB", (16, 16), (17 * (i % 15), 40, 200))]}
                                           for i, row in enumerate(rows)])

    return write_configs(out, {name: pictured(rows) for name, rows in zen_configs().items()
                               if name.startswith("conversational_")})


def build_fixtures(out: Path) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl_standins import build_qwen2

    qwen2 = build_qwen2(out / "qwen2")
    cls = AutoModelForSequenceClassification.from_pretrained(qwen2, num_labels=1)
    cls.config.pad_token_id = AutoTokenizer.from_pretrained(qwen2).pad_token_id
    cls.save_pretrained(out / "qwen2-cls")
    AutoTokenizer.from_pretrained(qwen2).save_pretrained(out / "qwen2-cls")
    return {"qwen2": qwen2, "qwen2-cls": out / "qwen2-cls", "zen": build_zen(out / "zen"),
            "zen-image": build_zen_image(out / "zen-image")}


# ---- the rewrite ----------------------------------------------------------------------------------------------------

def rewrite(text: str, fixtures: dict[str, Path], imports: bool = True) -> str:
    """Only `from trl import` lines and the fixture ids change."""
    if imports:
        text, n = re.subn(r"^from trl import ", "from alignkit_trl import ", text, flags=re.MULTILINE)
        if not n:
            raise SystemExit("the test file has no `from trl import` line: not the file expected")
    for hub, name in FIXTURES.items():
        text = text.replace(f'"{hub}"', f'"{fixtures[name]}"')
    return text


def availability_imports(text: str) -> str:
    """`from trl.import_utils import (is_X_available, ...)`: a name the installed trl lacks (the tests are from
    another TRL version) becomes a check that package X is importable, as TRL's own is_X_available does."""
    import importlib

    import_utils = importlib.import_module("trl.import_utils")

    def fix(match: re.Match) -> str:
        names = [n.strip() for n in match.group(1).replace("(", "").replace(")", "").split(",") if n.strip()]
        have = [n for n in names if hasattr(import_utils, n)]
        shims = [f"{n} = lambda: __import__('importlib.util').util.find_spec({n[3:-10]!r}) is not None"
                 for n in names if n not in have]
        return "\n".join([f"from trl.import_utils import ({', '.join(have)})", *shims])

    return re.sub(r"^from trl\.import_utils import (\([^)]*\)|[^\n]*)", fix, text, flags=re.MULTILINE)


def internal_imports(text: str) -> tuple[str, set[str]]:
    """`from trl.<module> import (...)` (TRL's internals: collators, helpers) keeps the names the installed trl has;
    each other name (the tests are from another TRL version) becomes None and is returned, so that the tests using
    it are excluded with that reason."""
    import importlib

    missing: set[str] = set()

    def fix(match: re.Match) -> str:
        module = match.group(1)
        names = [n.strip() for n in match.group(2).replace("(", "").replace(")", "").split(",") if n.strip()]
        try:
            have = [n for n in names if hasattr(importlib.import_module(module), n)]
        except ImportError:
            have = []
        missing.update(n for n in names if n not in have)
        lines = [f"from {module} import ({', '.join(have)})"] if have else []
        return "\n".join(lines + [f"{n} = None  # not in the installed TRL" for n in names if n not in have])

    text = re.sub(r"^from (trl\.[\w.]+) import (\([^)]*\)|[^\n]*)", fix, text, flags=re.MULTILINE)
    return text, missing


def test_sources(text: str) -> dict[str, tuple[str, str]]:
    """test function name -> (its class name, its source with decorators, its class's decorators first)."""
    tree, lines = ast.parse(text), text.splitlines()
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            markers = [lines[d.lineno - 1] for d in node.decorator_list]  # the class's (e.g. require_torch_accelerator)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                    start = min([d.lineno for d in item.decorator_list] + [item.lineno])
                    body = lines[start - 1:item.end_lineno]
                    out[f"{node.name}::{item.name}"] = (node.name, "\n".join(markers + body))
        elif isinstance(node, ast.Module):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                    out[item.name] = ("", "\n".join(lines[item.lineno - 1:item.end_lineno]))
    return out


def exclusion(nodeid: str, sources: dict[str, tuple[str, str]], missing: set[str]) -> str | None:
    key = nodeid.split(".py::", 1)[1].split("[", 1)[0]
    cls, source = sources.get(key, ("", ""))
    lacking = sorted(n for n in missing if re.search(rf"\b{re.escape(n)}\b", source))
    if lacking:
        return f"tests TRL internals the installed TRL lacks (the tests are from another TRL version): {lacking[0]}"
    subject = f"class:{cls}\n{nodeid}\n{source}"
    for pattern, reason in EXCLUSIONS:
        if re.search(pattern, subject):
            return reason
    params = nodeid.split("[", 1)[1] if "[" in nodeid else ""
    missing = sorted({hub for hub in HUB_ID.findall(source) + re.findall(HUB_NAME, params) if hub not in FIXTURES})
    return NO_STANDIN + ", ".join(missing) if missing else None


# ---- running --------------------------------------------------------------------------------------------------------

def run_trainer(trainer: str, tests: Path, fixtures: dict[str, Path], work: Path, against: str,
                pytest_args: list[str]) -> dict:
    folder = work / f"run-{trainer}" / "trl_tests"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in SUPPORT:
        if (tests / name).is_file():
            (folder / name).write_text(availability_imports((tests / name).read_text()))
    if (tests / "data").is_dir():
        shutil.copytree(tests / "data", folder / "data")
    original = (tests / f"test_{trainer}_trainer.py").read_text()
    text, missing = internal_imports(rewrite(original, fixtures, imports=against == "alignkit"))
    path = folder / f"test_{trainer}_trainer.py"
    path.write_text(text)
    sources = test_sources(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(folder.parent), *sys.path])}
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(folder.parent)]
    collected = subprocess.run([*base, "--collect-only", "-q", str(path)], cwd=folder.parent, env=env,
                               capture_output=True, text=True)
    nodeids = [line.strip() for line in collected.stdout.splitlines() if "::" in line]
    if not nodeids:
        raise SystemExit(f"collecting {path.name} found no tests:\n{collected.stdout[-3000:]}"
                         f"{collected.stderr[-3000:]}")
    excluded = {n: r for n in nodeids if (r := exclusion(n, sources, missing)) is not None}
    report = work / f"run-{trainer}" / "junit.xml"
    deselect = [arg for n in excluded for arg in ("--deselect", n)]
    args_file = work / f"run-{trainer}" / "args.txt"
    args_file.write_text("\n".join([*deselect, "--junitxml", str(report), "-q", "-rN",
                                    str(path), *pytest_args]))
    subprocess.run([*base, f"@{args_file}"], cwd=folder.parent, env=env)
    outcome = Counter()
    failures = {}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            outcome[kind] += 1
            if kind == "skipped":  # TRL's own markers (e.g. require_torch_accelerator): an exclusion with its reason
                excluded[f"{case.get('classname')}::{case.get('name')}"] = "skipped by TRL's own marker: " + next(
                    c for c in case if c.tag == "skipped").get("message", "")
            if kind in ("failure", "error"):
                message = next(c for c in case if c.tag == kind).get("message", "")
                failures[f"{case.get('classname')}::{case.get('name')}"] = message.splitlines()[0][:200] if message \
                    else ""
    return {"trainer": trainer, "tests": len(nodeids), "excluded": len(excluded), "run": len(nodeids) - len(excluded),
            "passed": outcome["passed"], "failed": outcome["failure"] + outcome["error"],
            "exclusions": Counter(excluded.values()), "failures": failures}


def print_result(r: dict) -> None:
    print(f"\n== {r['trainer']}: TRL's tests {r['tests']}, excluded {r['excluded']}, run {r['run']}: "
          f"passed {r['passed']}, failed {r['failed']}")
    for reason, n in r["exclusions"].most_common():
        print(f"   excluded {n:3d}: {reason}")
    for test, message in sorted(r["failures"].items()):
        print(f"   FAILED {test}: {message}")


RESULTS = re.compile(r"(<!-- results -->\n).*?(<!-- /results -->)", re.S)


def markdown(results: list[dict]) -> str:
    """The results table and, per trainer, its exclusions by reason and its failures (benchmarks/trl-tests.md)."""
    lines = ["| trainer | TRL's tests | excluded (reason below) | run | passed | failed |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['trainer']} | {r['tests']} | {r['excluded']} | {r['run']} | {r['passed']} | {r['failed']} |"
              for r in results]
    for r in results:
        lines += ["", f"### {r['trainer']}", "", "Excluded:", ""]
        lines += [f"- {n}: {reason}" for reason, n in Counter(r["exclusions"]).most_common()]
        if r["failures"]:
            lines += ["", "Failing (what is still missing):", ""]
            lines += [f"- `{test.split('::')[-1]}`: {message}" for test, message in sorted(r["failures"].items())]
        else:
            lines += ["", f"Failing: none ({r['passed']} of {r['run']} run pass)."]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, results: list[dict]) -> None:
    """Replace the part of `path` between `<!-- results -->` and `<!-- /results -->` with `markdown(results)`."""
    text = path.read_text()
    if not RESULTS.search(text):
        raise SystemExit(f"{path}: no <!-- results --> ... <!-- /results --> markers")
    path.write_text(RESULTS.sub(lambda m: m[1] + markdown(results) + m[2], text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", action="append", choices=TRAINERS, help="repeatable; default: all")
    parser.add_argument("--source", help=f"TRL source tree or archive (default: download {ARCHIVE})")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--against", choices=["alignkit", "trl"], default="alignkit")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--markdown", type=Path, help="write the results into this file's <!-- results --> part")
    parser.add_argument("--from-json", type=Path, nargs="+", help="no run: the results of earlier --json files")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    if args.from_json:
        results = [r for f in args.from_json for r in json.loads(f.read_text())]
        order = {t: i for i, t in enumerate(TRAINERS)}
        results = sorted({r["trainer"]: r for r in results}.values(), key=lambda r: order[r["trainer"]])
        if args.markdown:
            write_markdown(args.markdown, results)
        return 0
    try:
        import parameterized  # noqa: F401  (TRL's test files import it)
    except ImportError:
        raise SystemExit("TRL's test files need `parameterized`: pip install -e \".[bench]\"") from None
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tests = fetch_source(args.source, work)
        print(f"TRL tests from {args.source or ARCHIVE} (TRL {source_version(tests)})")
        fixtures = build_fixtures(work / "fixtures")
        results = []
        for trainer in args.trainer or TRAINERS:
            results.append(run_trainer(trainer, tests, fixtures, work, args.against, args.pytest_args))
            print_result(results[-1])
        if args.json:
            args.json.write_text(json.dumps([{**r, "exclusions": dict(r["exclusions"])} for r in results], indent=1))
        if args.markdown:
            write_markdown(args.markdown, results)
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
