"""The preference formatter and the sorting pairs are the core's: DPO, CPO and SimPO run with the core alone."""

import re
from pathlib import Path

import alignkit
from alignkit import load_config
from alignkit.engine.data import load_data
from alignkit.plugins import build_registry
from alignkit.testing import plugin_manager
from helpers import fast

ROOT = Path(__file__).resolve().parents[2]


def test_the_core_registers_the_preference_formatter_and_the_sort_data():
    from alignkit.formatters import PreferenceDataConfig, PreferenceFormatter

    registry = build_registry(plugin_manager())  # the core's own plugin only
    assert registry.formatters["preference"][0] is PreferenceFormatter
    assert PreferenceFormatter.config_class is PreferenceDataConfig
    assert {"sort", "sort-chat"} <= set(registry.datasets)
    assert len(load_data("builtin:sort", "test", registry.datasets)) == 200


def test_dpo_cpo_simpo_need_only_the_core(tmp_path):
    import alignkit_cpo
    import alignkit_dpo
    import alignkit_simpo

    for plugin, name in ((alignkit_dpo, "dpo"), (alignkit_cpo, "cpo"), (alignkit_simpo, "simpo")):
        pm = plugin_manager(plugin)  # no alignkit_orpo
        cfg, _ = load_config(name, plugins=pm)
        assert cfg.data.train == "builtin:sort"
        result = alignkit.run(name, fast(tmp_path / name, max_steps=1), plugins=pm)
        assert result.global_step == 1


def test_no_shipped_plugin_but_orpo_names_alignkit_orpo():
    """Methods stand on the core, not on ORPO; alignkit_trl re-exports every plugin's TRL names, ORPO's included."""
    for path in (ROOT / "plugins").rglob("*.py"):
        if "alignkit-trl" not in path.parts:
            assert not re.search(r"alignkit_orpo|ORPO's built-in", path.read_text()), path


def test_orpo_takes_the_cores_formatter():
    import alignkit_orpo
    from alignkit.formatters import PreferenceFormatter

    assert alignkit_orpo.METHOD.formatter in (PreferenceFormatter, "preference")
    assert not (ROOT / "alignkit_orpo" / "formatter.py").exists() and not (ROOT / "alignkit_orpo" / "demo.py").exists()


def test_method_size_targets():
    """Methods are config + loss on the core's blocks: the DPO plugin, TRL 1.16's whole DPO loss family with its
    tokenization, fits in 400 lines (TRL's dpo_trainer.py + dpo_config.py: 2,118), its online variant (sampling,
    ranking, TRL's metrics; TRL's online_dpo_trainer.py + config: over 1,000) in 250 more, SFT's loss (two loss
    types) in 31. (The TRL-style facade, trl.py, is not the method.)"""
    files = [p for p in (ROOT / "plugins/alignkit-dpo/alignkit_dpo").glob("*.py") if p.name != "trl.py"]
    lines = {p.name: len(p.read_text().splitlines()) for p in files}
    online = sum(n for name, n in lines.items() if name.startswith("online"))
    assert sum(lines.values()) - online <= 400 and 0 < online <= 250
    # SFT's loss: 30 lines for the NLL, one more for TRL's second SFT loss (dft), a term of the same scorer
    assert len((ROOT / "plugins/alignkit-sft/alignkit_sft/loss.py").read_text().splitlines()) <= 31


def test_pair_metrics_are_trls_pairwise_means():
    import torch

    from alignkit.blocks.logps import pair_metrics

    got = pair_metrics(torch.tensor([0.5, -0.2]), torch.tensor([0.1, 0.3]), torch.tensor([-1.0, -3.0]),
                       torch.tensor([-2.0, -4.0]))
    want = {"rewards/chosen": 0.15, "rewards/rejected": 0.2, "rewards/accuracies": 0.5, "rewards/margins": -0.05,
            "logps/chosen": -2.0, "logps/rejected": -3.0}
    assert {k: round(float(v), 6) for k, v in got.items()} == want
