"""The plugin manager: hookspecs, entry points (group `alignkit`), and the registry of methods.

`ALIGNKIT_LOAD_PLUGINS=dist1,dist2` loads only those distributions' entry points ('' loads none).
"""

import functools
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pluggy

from alignkit.errors import PluginError, did_you_mean
from alignkit.plugin import hookspecs
from alignkit.plugin.method import Method

ENTRY_POINT_GROUP = "alignkit"
ALLOW_LIST_VAR = "ALIGNKIT_LOAD_PLUGINS"
CORE_PLUGIN = "alignkit-core"
#: the singular of each part table's name, for messages
ONE = {"formatters": "formatter", "losses": "loss", "datasets": "dataset"}


def _canonical(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


@dataclass
class BrokenPlugin:
    """An entry point whose import failed: reported, never fatal for other plugins."""

    dist: str
    entry_point: str
    error: str


@dataclass
class Registry:
    """Methods, formatters and losses by name, plus the plugins that failed to load."""

    methods: dict[str, Method] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    formatters: dict[str, tuple[type, str]] = field(default_factory=dict)  # name -> (class, source)
    losses: dict[str, tuple[type, str]] = field(default_factory=dict)
    datasets: dict[str, tuple[Callable, str]] = field(default_factory=dict)  # name -> (loader, source)

    def add_part(self, kind: str, name: str, cls: type, source: str) -> None:
        table = getattr(self, kind)
        if name in table:
            raise PluginError(f"{ONE[kind]} {name!r} is registered twice: by {table[name][1]} and by {source}")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {source} registered a {ONE[kind]} under the name {name!r}; names are non-empty "
                              "strings")
        table[name] = (cls, source)

    def part(self, kind: str, name: str, wanted_by: str) -> type:
        table = getattr(self, kind)
        if name not in table:
            raise PluginError(f"method {wanted_by!r} uses {ONE[kind]} {name!r}{did_you_mean(name, table)}, which no "
                              f"plugin registers; registered {kind}: {', '.join(sorted(table)) or 'none'}")
        return table[name][0]

    def resolve(self, method: Method) -> Method:
        """The method with formatter and loss given by name replaced by their classes, and its config
        extended by the fields its formatter and its rollout read (their config_class)."""
        formatter = self.part("formatters", method.formatter, method.name) if isinstance(method.formatter,
                                                                                         str) else method.formatter
        loss = self.part("losses", method.loss, method.name) if isinstance(method.loss, str) else method.loss
        config = method.config
        for part in (formatter, method.rollout):  # the fields each part reads (e.g. a rollout's environment keys)
            needed = getattr(part, "config_class", None)
            config = config if needed is None else _with_fields(config, needed)
        return replace(method, formatter=formatter, loss=loss, config=config)

    def add(self, method: Method, source: str = "", version: str = "", plugin: str = "") -> None:
        if not isinstance(method, Method):
            raise PluginError(f"plugin {source} registered {type(method).__name__} {method!r}, not alignkit.Method")
        method = replace(method, source=source, version=version, plugin=plugin)
        if method.rollout is not None:  # the Rollout Protocol (alignkit.online.rollout), checked here: one line
            from alignkit.online.rollout import check_rollout

            check_rollout(method.rollout, f"plugin {source or plugin}: method {method.name!r}")
        if method.name in self.methods:
            first = self.methods[method.name].source
            raise PluginError(
                f"method {method.name!r} is registered twice: by {first} and by {method.source}; "
                f"uninstall one or restrict plugins with {ALLOW_LIST_VAR}"
            )
        self.methods[method.name] = method

    def get(self, name: str) -> Method:
        if name in self.methods:
            return self.resolve(self.methods[name])
        for b in self.broken:
            if b.entry_point == name:
                raise PluginError(f"method {name!r} comes from plugin {b.dist}, which failed to load: {b.error}")
        known = ", ".join(sorted(self.methods)) or "none"
        broken = "".join(f"; plugin {b.dist} failed to load: {b.error}" for b in self.broken)
        raise PluginError(f"unknown method {name!r}{did_you_mean(name, self.methods)}; registered: {known}{broken}")


@functools.cache
def _with_fields(config: type, needed: type) -> type:
    """`config` plus the fields of `needed`, as a class importable from config's module (so that
    datasets can fingerprint formatters holding it, and preprocessing is cached)."""
    if issubclass(config, needed):
        return config
    name = f"{config.__name__}With{needed.__name__}"
    combined = type(name, (config, needed), {"__module__": config.__module__, "__doc__": config.__doc__,
                                             "__reduce__": _reduce_combined})
    module = sys.modules.get(config.__module__)
    if module is not None:  # a config defined outside any module (a notebook cell) still works, uncached
        setattr(module, name, combined)
    return combined


def _parts(cls):
    """A class as the importable classes it was combined from (nested pairs), or itself."""
    return tuple(_parts(b) for b in cls.__bases__) if cls.__dict__.get("__reduce__") is _reduce_combined else cls


def _built(parts):
    return _with_fields(_built(parts[0]), _built(parts[1])) if isinstance(parts, tuple) else parts


def _reduce_combined(self):
    """Pickled as the classes it was combined from and its state: a fresh process (a spawned DataLoader worker)
    combines them again."""
    return _rebuild_combined, (_parts(type(self)), self.__getstate__())


def _rebuild_combined(parts, state: dict):
    cls = _built(parts)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _allowed(dist_name: str) -> bool:
    allow = os.environ.get(ALLOW_LIST_VAR)
    if allow is None:
        return True
    return _canonical(dist_name) in {_canonical(d.strip()) for d in allow.split(",") if d.strip()}


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from and which failed to load."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.sources: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self.broken: list[BrokenPlugin] = []

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else ep.value
            if not _allowed(dist) or self.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken plugin must not take the others down
                self.broken.append(BrokenPlugin(dist, ep.name, f"{type(e).__name__}: {e}"))
                continue
            self.register(plugin, name=ep.name)
            self.sources[ep.name] = (dist, ep.dist.version if ep.dist else "")


def get_plugin_manager(plugins: list | None = None, load_entrypoints: bool = True) -> PluginManager:
    """A fresh manager: the hookspecs, installed entry points (unless disabled), then `plugins`."""
    pm = PluginManager()
    from alignkit import formatters  # the core's own built-in plugin: its formatters, which name no method

    pm.register(formatters, name=CORE_PLUGIN)
    pm.sources[CORE_PLUGIN] = ("alignkit", "")
    if load_entrypoints:
        pm.load_entry_points()
    for plugin in plugins or []:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin!r} implements a hook alignkit does not define: {e}") from None
    return pm


def _register_parts(pm: PluginManager, registry: Registry, kind: str) -> None:
    for impl in getattr(pm.hook, f"register_{kind}").get_hookimpls():
        dist = pm.sources.get(impl.plugin_name, (impl.plugin_name, ""))[0]
        impl.function(register=lambda name, part, k=kind, d=dist: registry.add_part(k, name, part, d))


def build_registry(pm: PluginManager) -> Registry:
    """Ask every plugin to register its methods and parts; record which distribution and plugin each came from."""
    registry = Registry(broken=list(pm.broken))
    for kind in ("formatters", "losses", "datasets"):
        _register_parts(pm, registry, kind)
    for impl in pm.hook.register_methods.get_hookimpls():
        dist, version = pm.sources.get(impl.plugin_name, (impl.plugin_name, ""))
        impl.function(register=lambda m, d=dist, v=version, p=impl.plugin_name: registry.add(m, d, v, p))
    return registry


def registered_datasets(pm: PluginManager) -> dict[str, tuple[Callable, str]]:
    """The built-in datasets the plugins register: name -> (loader, source)."""
    registry = Registry()
    _register_parts(pm, registry, "datasets")
    return registry.datasets


LIFECYCLE_HOOKS = ("on_train_start", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")
ALL_RUNS_ATTRIBUTE = "alignkit_all_runs"


class RunHooks:
    """The lifecycle hooks as one run calls them: `hooks.on_log(run=..., step=..., logs=...)`.

    A plugin that registers methods has its lifecycle hooks called for runs of those methods only, unless
    it sets `alignkit_all_runs = True`; a plugin that registers no method (a tracker, a logger, an object
    registered for one run) sees every run. Plugins registered later (e.g. a run's observers) are included.
    """

    def __init__(self, pm: pluggy.PluginManager, method: Method) -> None:
        owners: dict[str, str] = {}  # method name -> plugin name
        for impl in pm.hook.register_methods.get_hookimpls():
            impl.function(register=lambda m, p=impl.plugin_name: owners.setdefault(getattr(m, "name", ""), p))
        own = method.plugin or owners.get(method.name, "")
        method_plugins = {impl.plugin for impl in pm.hook.register_methods.get_hookimpls() if impl.plugin_name != own}
        self.excluded = [p for p in method_plugins if not getattr(p, ALL_RUNS_ATTRIBUTE, False)]
        for name in LIFECYCLE_HOOKS:
            setattr(self, name, pm.subset_hook_caller(name, self.excluded) if self.excluded else getattr(pm.hook, name))
