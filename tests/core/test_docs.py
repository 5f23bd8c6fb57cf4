"""Docs that cannot rot: every hook is documented, README examples run, CI runs the README's commands."""

import inspect
import json
import re
import subprocess
import sys
import types

import pytest

import alignkit
from alignkit.plugin import hookspecs
from alignkit.testing import plugin_manager
from helpers import ROOT, fast

README = (ROOT / "README.md").read_text()


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_every_hookspec_is_documented():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    specs = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "alignkit_spec")]
    assert {"register_methods", "register_datasets", "register_rewards", "on_train_start", "on_evaluate"} <= set(specs)
    for name in specs:
        signature = f"## {name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})"
        assert signature in doc, f"docs/hooks.md lacks '{signature}'"
        assert name in README


def test_ci_runs_the_readme_commands():
    setup, tests = code_blocks(README, "bash")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup.strip() in ci and tests.strip() in ci
    assert "torch==2.13.0" in setup


def test_readme_plugin_example_trains(tmp_path):
    source = next(b for b in code_blocks(README, "python") if "register_methods" in b)
    module = types.ModuleType("readme_plugin")
    exec(compile(source, "README.md", "exec"), module.__dict__)
    import alignkit_orpo

    pm = plugin_manager(alignkit_orpo, module)
    result = alignkit.run("sigmoid-pref", fast(tmp_path), plugins=pm)
    assert result.global_step == 4 and "eval_rewards/margins" in result.metrics
    toml = code_blocks(README, "toml")[0]
    assert 'sigmoid-pref = "my_plugin_module"' in toml


def test_writing_a_method_guide_runs(tmp_path, tok):
    """The guide's SFT-style plugin (public API only, about forty lines) trains; its tests pass; its own-format
    example gives the ids of the core's prompt-completion formatter on the same conversation."""
    guide = (ROOT / "docs" / "writing-a-method.md").read_text()
    plugin_code, test_code, formatter_code = code_blocks(guide, "python")[:3]
    module = types.ModuleType("alignkit_nll")
    exec(compile(plugin_code, "writing-a-method.md", "exec"), module.__dict__)
    assert len(plugin_code.strip().splitlines()) <= 45  # "about forty lines"
    assert not re.search(r"^from alignkit\.(?!formatters|testing)|alignkit\._|helpers", plugin_code + test_code, re.M)
    namespace = {"nll_plugin": module}
    exec(compile(test_code, "writing-a-method.md", "exec"), namespace)
    namespace["test_nll_trains"](tmp_path)
    namespace["test_nll_loss_by_hand"]()
    toml = code_blocks(guide, "toml")[0]
    assert 'nll = "alignkit_nll"' in toml and 'name = "alignkit-nll"' in toml

    from alignkit.formatters import PromptCompletionFormatter, SequenceDataConfig

    own = {}
    exec(compile(formatter_code, "writing-a-method.md", "exec"), own)
    config = SequenceDataConfig(name="t", max_length=12)
    row = {"question": "sort: 2 1", "answer": "1 2"}
    core = PromptCompletionFormatter(config, tok).format({"prompt": [{"role": "user", "content": row["question"]}],
                                                         "completion": [{"role": "assistant",
                                                                         "content": row["answer"]}]})
    ours = own["QuestionAnswerFormatter"](config, tok).format(row)
    assert ours.features == core.features and ours.truncated == core.truncated


# ---------------------------------------------------------------- figures, layout and routes the README promises

sys.path.insert(0, str(ROOT / "scripts"))
import readme_figures  # noqa: E402


def test_every_readme_figure_is_rendered_from_the_results_file():
    """The demo tables and timings in README.md and the plugin READMEs are exactly what
    `scripts/readme_figures.py` renders from docs/figures.json, which holds every shipped method's demo."""
    figures = readme_figures.load()
    folders = {"orpo"} | {p.name.removeprefix("alignkit-") for p in (ROOT / "plugins").iterdir() if p.is_dir()}
    folders -= {"trl"}  # alignkit-trl registers no method: it re-exports the plugins' TRL-style trainers
    shipped = {m.name for m in alignkit.methods()}  # a plugin may register several (dpo: dpo and online-dpo)
    assert folders <= shipped and set(figures["methods"]) == shipped == set(readme_figures.METHODS)
    for method, result in figures["methods"].items():
        assert result["command"] == f"alignkit -q run --method {method}" and result["evals"][0]["step"] == 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", result["date"])
        if "timing" in result:  # a time always comes with its command and date
            assert result["timing"]["command"].endswith(result["command"]) and result["timing"]["date"]
    assert {"machine", "threads"} <= set(figures)
    for name, (now, rendered) in readme_figures.rendered(figures).items():
        assert now == rendered, (f"{name} differs from docs/figures.json: "
                                 "run `python scripts/readme_figures.py --render`")
    readmes = [ROOT / "README.md", *sorted((ROOT / "plugins").glob("*/README.md"))]
    assert {str(p.relative_to(ROOT)) for p in readmes} == set(readme_figures.BLOCKS)


def test_no_figure_is_written_by_hand_outside_the_rendered_blocks():
    """Demo tables and measured times live only in the rendered blocks (or cite a benchmarks/ results file)."""
    hand = re.compile(r"^\| step \||\d s wall|\d+ tests\b|\d min\b|\beval_\w+[`]? \d\.\d", re.M)
    for name in readme_figures.BLOCKS:
        outside = readme_figures.BLOCK.sub("", (ROOT / name).read_text())
        assert not hand.findall(outside), (name, hand.findall(outside))


def test_a_figure_written_by_hand_is_caught(tmp_path, monkeypatch):
    """The rendering check fails on a README whose figure was edited by hand, and --render repairs it."""
    stale = README.replace("<!-- figures:orpo -->\n| step |", "<!-- figures:orpo -->\n| Step |")
    assert stale != README
    (tmp_path / "README.md").write_text(stale)
    for name in readme_figures.BLOCKS:
        if name != "README.md":
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text((ROOT / name).read_text())
    monkeypatch.setattr(readme_figures, "ROOT", tmp_path)
    now, rendered = readme_figures.rendered(readme_figures.load())["README.md"]
    assert now == stale and rendered == README


def test_the_layout_lists_every_plugin_and_folder():
    layout = README.split("## Layout", 1)[1]
    for plugin in (ROOT / "plugins").iterdir():
        if plugin.is_dir():
            assert re.search(rf"^\s+{plugin.name}\s+\S", layout, re.M), f"README layout lacks {plugin.name}"
    for folder in ("alignkit/", "alignkit_orpo/", "plugins/", "configs/", "examples/", "benchmarks/", "scripts/",
                   "docs/", "tests/"):
        assert re.search(rf"^{folder}\s", layout, re.M), folder
    for doc in (ROOT / "docs").iterdir():
        assert doc.name in layout, f"README layout lacks docs/{doc.name}"


def test_the_offline_trl_style_route_trains(tmp_path, monkeypatch):
    """The README's TRL-style example on the built-in model and data runs offline (conftest sets HF_HUB_OFFLINE)
    and saves a model that loads."""
    from transformers import AutoModelForCausalLM

    source = next(b for b in code_blocks(README, "python") if 'model="builtin:tiny"' in b)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(source, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    out = tmp_path / trainer.args.output_dir
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_a_demo_whose_figures_moved_fails_its_check(tmp_path, monkeypatch):
    """What the demo-job tests call: a run equal to docs/figures.json passes; one whose held-out loss moved in the
    third decimal (a code change) fails, saying to re-run the script; so does a missing eval row."""
    monkeypatch.setattr(readme_figures, "machine", lambda: readme_figures.load()["machine"])  # the README's CPU
    evals = readme_figures.load()["methods"]["sft"]["evals"]
    metrics = tmp_path / "metrics.jsonl"

    def write(rows):
        metrics.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 9.0}, *rows]))

    write(evals)
    readme_figures.assert_demo_matches("sft", metrics)
    moved = [dict(r) for r in evals]
    moved[-1]["eval_loss"] += 0.005
    write(moved)
    with pytest.raises(AssertionError, match="run `python scripts/readme_figures.py`"):
        readme_figures.assert_demo_matches("sft", metrics)
    write(evals[:-1])
    with pytest.raises(AssertionError, match="readme_figures"):
        readme_figures.assert_demo_matches("sft", metrics)


def test_each_cpu_is_checked_against_its_own_figures(tmp_path, monkeypatch):
    """Another CPU rounds differently, so a demo run is checked against the figures made on its own CPU (an
    `elsewhere` record); a CPU with none gets its eval steps checked and a warning, never the README CPU's decimals."""
    readme = {"step": 0, "eval_loss": 1.0}, {"step": 50, "eval_loss": 0.5}
    other = {"step": 0, "eval_loss": 1.0}, {"step": 50, "eval_loss": 0.6}
    figures = {"machine": "cpu A", "threads": 2, "methods": {"sft": {"evals": list(readme)}}, "configs": {},
               "elsewhere": {"cpu B": {"sft": list(other)}}}
    monkeypatch.setattr(readme_figures, "load", lambda: figures)
    metrics = tmp_path / "metrics.jsonl"

    def check(cpu, rows):
        monkeypatch.setattr(readme_figures, "machine", lambda: cpu)
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        readme_figures.assert_demo_matches("sft", metrics)

    check("cpu A", readme)
    check("cpu B", other)
    with pytest.raises(AssertionError, match="step 50 eval_loss: 0.5 vs 0.6"):
        check("cpu B", readme)
    with pytest.raises(AssertionError, match="step 50 eval_loss: 0.6 vs 0.5"):
        check("cpu A", other)
    with pytest.warns(UserWarning, match="no sft demo figures were made on cpu C: only its eval steps"):
        check("cpu C", other)
    with pytest.raises(AssertionError, match="eval steps"), pytest.warns(UserWarning):
        check("cpu C", other[:1])


def test_a_full_run_on_another_cpu_keeps_the_old_cpus_figures_and_a_moved_demo_drops_them(tmp_path, monkeypatch):
    figures_file = tmp_path / "figures.json"
    demos = [*readme_figures.METHODS, *readme_figures.CONFIG_DEMOS]
    old = {"machine": "cpu A", "threads": 2, "elsewhere": {"cpu B": {"sft": [{"step": 0, "eval_loss": 7.0}]}},
           "methods": {m: {"evals": [{"step": 0, "eval_loss": 1.0}]} for m in readme_figures.METHODS},
           "configs": {m: {"evals": [{"step": 0, "eval_loss": 1.0}]} for m in readme_figures.CONFIG_DEMOS}}
    figures_file.write_text(json.dumps(old))
    monkeypatch.setattr(readme_figures, "FIGURES", figures_file)
    monkeypatch.setattr(readme_figures, "default_threads", lambda: 2)
    loss = {"value": 2.0}
    monkeypatch.setattr(readme_figures, "run_demo", lambda method, timed: {
        "command": method, "evals": [{"step": 0, "eval_loss": loss["value"]}]})
    monkeypatch.setattr(readme_figures, "machine", lambda: "cpu B")
    with pytest.raises(SystemExit, match="--elsewhere"):
        readme_figures.measure(["sft"], False)  # a partial run on another CPU would mix two CPUs' figures
    figures = readme_figures.measure(demos, False)
    assert figures["machine"] == "cpu B" and "cpu B" not in figures["elsewhere"]
    assert figures["elsewhere"]["cpu A"]["sft"] == [{"step": 0, "eval_loss": 1.0}]
    assert figures["methods"]["sft"]["evals"] == [{"step": 0, "eval_loss": 2.0}]
    figures_file.write_text(json.dumps(figures))
    again = readme_figures.measure(["sft", "dpo"], False)  # the same figures: the other CPU's records stay
    assert set(again["elsewhere"]["cpu A"]) == set(demos)
    figures_file.write_text(json.dumps(again))
    loss["value"] = 3.0  # a code change moved them: what cpu A recorded was the old code's
    moved = readme_figures.measure(["sft"], False)
    assert "sft" not in moved["elsewhere"]["cpu A"] and "dpo" in moved["elsewhere"]["cpu A"]


def test_benchmark_figures_in_the_readmes_are_in_the_results_files():
    """Outside the rendered blocks, a measured figure (a speed or memory ratio, a peak in MB, a parity difference
    such as 6.0e-6) appears in a benchmarks/ results file, which holds its command and date."""
    results = "\n".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.md"))
    ratios = set(re.findall(r"\b\d+\.\d+x\b|\b\d[\d,]* MB\b", results))
    diffs = {f"{float(x):.1e}" for x in re.findall(r"\b\d\.\de[-+]\d+\b", results)}
    checked = 0
    for name in readme_figures.BLOCKS:
        text = readme_figures.BLOCK.sub("", (ROOT / name).read_text())
        for figure in re.findall(r"\b\d+\.\d+x\b|\b\d[\d,]* MB\b", text):
            assert figure in ratios, f"{name}: {figure} is in no benchmarks/*.md results file"
            checked += 1
        for figure in re.findall(r"\b\d\.\de-\d+\b", text):
            assert f"{float(figure):.1e}" in diffs, f"{name}: {figure} is in no benchmarks/*.md results file"
            checked += 1
    assert checked >= 10


def test_every_test_the_readmes_cite_exists():
    """A promise backed by a named test names a test (or test file) that is in the suite."""
    tests = ROOT / "tests"
    files = {p.name: p for p in tests.rglob("*.py")}  # tests are filed by subject: a citation names the file
    source = "\n".join(p.read_text() for p in files.values())
    defined = set(re.findall(r"^(?:    )?def (test_\w+)", source, re.M))
    cited = 0
    for name in readme_figures.BLOCKS:
        text = (ROOT / name).read_text()
        for file in re.findall(r"\b(test_\w+\.py)\b", text):
            assert file in files, f"{name} cites tests/{file}, which does not exist"
            cited += 1
        for test in re.findall(r"\b(test_\w+)\b(?!\.py|\*)", text):
            assert test in defined or f"{test}.py" in files, f"{name} cites {test}, which is no test"
            cited += 1
    assert cited >= 20


def test_a_timing_is_parsed_from_time_v_and_rendered_with_its_command_and_date():
    """`--timings` reads /usr/bin/time -v's report; a rendered time names its command, date and machine."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", "x = bytearray(200 * 2 ** 20)"],
                          capture_output=True, text=True, check=True)
    timing = readme_figures.parse_time_v(proc.stderr)
    assert timing["wall_s"] > 0 and timing["cpu_s"] >= 0 and 0.2 <= timing["peak_rss_gb"] < 2
    figures = readme_figures.load()
    figures["methods"]["dpo"]["timing"] = {"command": "/usr/bin/time -v alignkit -q run --method dpo",
                                           "machine": "a 2-core X CPU", "date": "2031-01-02", **timing}
    text = readme_figures.timing(figures, "dpo")
    assert text.startswith("Measured 2031-01-02 with `/usr/bin/time -v alignkit -q run --method dpo` on a 2-core X")
    assert f"{timing['wall_s']:g} s wall" in text


def test_the_check_mode_agrees_with_the_readmes():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_figures.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_readme_describes_the_built_in_model_and_data_as_they_are():
    """The default job's description: the built-in model's size and layers, the demo data's sizes."""
    from alignkit.engine.data import load_data
    from alignkit.testing import tiny_model

    model = tiny_model()
    size = sum(p.numel() for p in model.parameters())
    assert f"builds a {model.config.num_hidden_layers}-layer Llama ({size:,} parameters" in README
    assert model.config.tie_word_embeddings
    train, test = (load_data("builtin:sort", split) for split in ("train", "test"))
    assert f"`builtin:sort`: {len(train):,} preference pairs" in README
    assert f"Evaluation uses {len(test)}\nheld-out pairs" in README or f"Evaluation uses {len(test)} held-out" in README


@pytest.mark.parametrize("method", ["dpo", "cpo", "simpo"])
def test_a_pairwise_plugin_readme_lists_what_its_demo_logs(method):
    """The `Logged:` list of the DPO, CPO and SimPO READMEs is the set of metrics their demo's eval rows hold."""
    logged = {k.removeprefix("eval_") for k in readme_figures.load()["methods"][method]["evals"][-1]} - {"step", "loss"}
    text = (ROOT / "plugins" / f"alignkit-{method}" / "README.md").read_text()
    listed = set(re.findall(r"`([\w/]+)`", text.split("Logged:", 1)[1].split("\n`pip", 1)[0]))
    assert listed == logged
