"""The plugin registry: in-process registration, entry points, errors that name their sources."""

import sys
import textwrap

import pytest

import alignkit
import alignkit_orpo
from alignkit import Method, MethodConfig, PluginError, hookimpl
from alignkit.plugins import build_registry, get_plugin_manager
from alignkit.testing import plugin_manager


def make_plugin(method_name: str, description: str = "a test method"):
    class Config(MethodConfig):
        name: str = method_name

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Method(name=method_name, config=Config, formatter=alignkit_orpo.PreferenceFormatter,
                            loss=alignkit_orpo.ORPOLoss, description=description))

    return Plugin()


def install_fake_dist(root, dist: str, entry_point: str, module: str, source: str) -> None:
    """Lay out what `pip install` leaves: a module and a dist-info with an alignkit entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[alignkit]\n{entry_point} = {module}\n")


GOOD_PLUGIN = """
    import alignkit, alignkit_orpo

    class Config(alignkit.MethodConfig):
        name: str = "fakemethod"

    @alignkit.hookimpl
    def register_methods(register):
        register(alignkit.Method(name="fakemethod", config=Config, formatter=alignkit_orpo.PreferenceFormatter,
                                 loss=alignkit_orpo.ORPOLoss, description="fake"))
"""


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, "alignkit-fake", "fakemethod", "alignkit_fake_mod", GOOD_PLUGIN)
    install_fake_dist(tmp_path, "alignkit-broken", "brokenmethod", "alignkit_broken_mod",
                      "import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for mod in ("alignkit_fake_mod", "alignkit_broken_mod"):
        sys.modules.pop(mod, None)


def test_in_process_registration_with_fresh_manager():
    registry = build_registry(plugin_manager(make_plugin("alpha"), make_plugin("beta")))
    assert sorted(registry.methods) == ["alpha", "beta"]
    assert build_registry(plugin_manager()).methods == {}


def test_registers_is_a_register_methods_hook_for_the_methods_it_is_given():
    class Config(MethodConfig):
        name: str = "gamma"

    methods = [Method(name=n, config=Config, formatter="preference", loss="orpo", description=n)
               for n in ("gamma", "delta")]
    plugin = type(sys)("alignkit_registers_mod")
    plugin.register_methods = alignkit.registers(*methods)
    registry = build_registry(plugin_manager(alignkit_orpo, plugin))
    assert sorted(registry.methods) == ["delta", "gamma", "orpo"]
    assert registry.get("gamma").description == "gamma" and registry.get("gamma").plugin == "alignkit_registers_mod"


def test_orpo_is_registered_through_its_entry_point(monkeypatch):
    monkeypatch.delenv("ALIGNKIT_LOAD_PLUGINS", raising=False)
    method = build_registry(get_plugin_manager()).get("orpo")
    assert method.source == "alignkit" and method.version == alignkit.__version__
    assert method.config is alignkit_orpo.ORPOMethodConfig


def test_duplicate_name_names_both_sources():
    pm = plugin_manager(alignkit_orpo, make_plugin("orpo"))
    with pytest.raises(PluginError, match=r"'orpo' is registered twice: by .* and by .*"):
        build_registry(pm)


def test_unknown_method_lists_registered_and_suggests_closest():
    registry = build_registry(plugin_manager(alignkit_orpo, make_plugin("simpo")))
    with pytest.raises(PluginError) as err:
        registry.get("opro")
    assert "did you mean 'orpo'" in str(err.value) and "registered: orpo, simpo" in str(err.value)


def test_misspelled_hookimpl_is_an_error():
    class Typo:
        @hookimpl
        def register_method(self, register):  # missing the "s"
            pass

    with pytest.raises(PluginError, match="register_method"):
        plugin_manager(Typo())


def test_registering_something_else_than_a_method_is_an_error():
    class Wrong:
        @hookimpl
        def register_methods(self, register):
            register("orpo")

    with pytest.raises(PluginError, match="not alignkit.Method"):
        build_registry(plugin_manager(Wrong()))


def test_broken_plugin_is_reported_and_others_still_load(fake_dists, monkeypatch):
    monkeypatch.delenv("ALIGNKIT_LOAD_PLUGINS", raising=False)
    registry = build_registry(get_plugin_manager())
    assert {"orpo", "fakemethod"} <= set(registry.methods)
    assert registry.methods["fakemethod"].source == "alignkit-fake"
    assert registry.methods["fakemethod"].version == "1.2.3"
    [broken] = registry.broken
    assert broken.dist == "alignkit-broken" and "a_module_that_does_not_exist" in broken.error
    with pytest.raises(PluginError, match="comes from plugin alignkit-broken, which failed to load: ModuleNotFound"):
        registry.get("brokenmethod")


@pytest.mark.parametrize("allow, expected", [
    ("", set()),
    ("alignkit", {"orpo"}),
    ("alignkit_fake", {"fakemethod"}),
    ("alignkit-fake, alignkit", {"orpo", "fakemethod"}),
])
def test_allow_list_variable(fake_dists, monkeypatch, allow, expected):
    monkeypatch.setenv("ALIGNKIT_LOAD_PLUGINS", allow)
    registry = build_registry(get_plugin_manager())
    assert set(registry.methods) == expected
    assert registry.broken == []


def test_core_never_imports_or_names_a_method():
    import re
    from pathlib import Path

    core = Path(alignkit.__file__).parent
    shipped = re.compile(r"\b(orpo|dpo|cpo|simpo|sft|kto|grpo|dapo|rloo|gkd)\b", re.IGNORECASE)  # every method we ship
    for path in core.rglob("*.py"):
        text = path.read_text()
        assert "orpo" not in text.lower(), path
        assert not shipped.search(text), (path, shipped.search(text))


def test_uninstalling_a_plugin_removes_its_method(tmp_path, monkeypatch):
    """What `pip uninstall` does (remove the module and its dist-info) makes the method disappear."""
    monkeypatch.delenv("ALIGNKIT_LOAD_PLUGINS", raising=False)
    install_fake_dist(tmp_path, "alignkit-fake", "fakemethod", "alignkit_fake_mod", GOOD_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "fakemethod" in build_registry(get_plugin_manager()).methods
        import shutil

        shutil.rmtree(tmp_path / "alignkit_fake-1.2.3.dist-info")
        (tmp_path / "alignkit_fake_mod.py").unlink()
        import importlib

        importlib.invalidate_caches()
        registry = build_registry(get_plugin_manager())
        assert "fakemethod" not in registry.methods and registry.broken == []
    finally:
        sys.modules.pop("alignkit_fake_mod", None)


def test_duplicate_formatter_name_names_both_sources():
    class Again:
        @hookimpl
        def register_formatters(self, register):
            register("preference", alignkit_orpo.PreferenceFormatter)

    with pytest.raises(PluginError, match="formatter 'preference' is registered twice: by alignkit and by"):
        build_registry(plugin_manager(alignkit_orpo, Again()))


@pytest.mark.parametrize(("part", "said"), [("loss", "loss 'nope', which no plugin registers; registered losses: orpo"),
                                            ("formatter", "formatter 'nope', which no plugin registers")])
def test_a_method_naming_an_unregistered_part_says_which_part_in_words(part, said):
    class Config(MethodConfig):
        name: str = "gamma"

    parts = {"formatter": "preference", "loss": "orpo", part: "nope"}
    plugin = type(sys)("alignkit_parts_mod")
    plugin.register_methods = alignkit.registers(Method(name="gamma", config=Config, description="g", **parts))
    with pytest.raises(PluginError, match=f"method 'gamma' uses {said}"):
        build_registry(plugin_manager(alignkit_orpo, plugin)).get("gamma")
