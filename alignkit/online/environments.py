"""Environments for multi-turn rollouts, found by name among the plugins.

An environment is a small object, built fresh for every episode as `factory(options)` (or `factory()` when the
factory declares no `options_class`), with

    reset(row) -> list of messages             the episode's first observation (the prompt row's `prompt` as a
                                               user message, say); [] or None: the row's prompt as it is
    step(assistant_message) -> (messages | None, reward parts, done)
                                               the model's turn ({"role": "assistant", "content": text}) in; the
                                               observation (e.g. `tool` messages) the model reads next, a dict
                                               {part: float} of rewards for this turn, and whether the episode ended

Either may be `async def` (awaited, a turn's episodes concurrently). Optional attributes: `options_class` (a
pydantic model: the options `method.environment_options` sets, validated before any work), `reward_names` (the
reward parts `step` may return: each becomes a reward column `env/NAME` summed over the episode's turns, weight 1),
`tools` (the functions whose schemas the chat template gets as `tools=`).

A plugin registers environments with the `register_environments(register)` hook: `register(name, factory)`. The
core registers `calculator` itself (alignkit.online.calculator). `ToolEnvironment` is the common case: a subclass
lists plain functions in `tools`; each model turn's tool calls (alignkit.online.tools) are run with a timeout and
their results fed back as `tool` messages; a turn without a tool call ends the episode.
"""

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignkit.errors import ConfigError, PluginError, did_you_mean
from alignkit.online.tools import QWEN, parse_tool_calls, run_tool, tool_schema
from alignkit.plugin.method import MethodConfig

Messages = list[dict]


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: dict) -> Messages | None: ...

    def step(self, message: dict) -> tuple[Messages | None, dict, bool]: ...


class EnvironmentConfig(MethodConfig):
    """The `method:` keys of a rollout that can run an environment (GroupRollout's `config_class`)."""

    environment: str | None = Field(None, description="Multi-turn rollouts in this environment (registered by "
                                    "plugins; `alignkit environments` lists them); null: one completion per prompt.")
    environment_options: dict[str, Any] = Field(default_factory=dict,
                                                description="The environment's own options (its options_class).")
    max_turns: int = Field(4, gt=0, description="With an environment: most model turns per episode (the episode's "
                           "tokens are also bounded by max_completion_length).")
    max_turn_length: int | None = Field(None, gt=0, description="With an environment: most new tokens per model "
                                        "turn (null: what is left of max_completion_length).")


async def _value(x):
    return await x if inspect.isawaitable(x) else x


def resolve_all(values: list) -> list:
    """Each value, awaited where it is awaitable (concurrently); plain values as they are."""
    if not any(inspect.isawaitable(v) for v in values):
        return values

    async def gather():
        return await asyncio.gather(*(_value(v) for v in values))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    raise PluginError("an async environment was stepped from inside a running event loop; call the rollout from "
                      "synchronous code")


class EnvironmentRegistry:
    """Environment factories by name, and which plugin distribution registered each."""

    def __init__(self) -> None:
        self.factories: dict[str, tuple[Callable, str]] = {}

    @classmethod
    def from_plugins(cls, pm=None) -> "EnvironmentRegistry":
        """The core's built-in environments, then every plugin's."""
        from alignkit.online.calculator import CalculatorEnvironment

        registry = cls()
        registry.add("calculator", CalculatorEnvironment, "alignkit")
        if pm is not None:
            for impl in pm.hook.register_environments.get_hookimpls():
                source = getattr(pm, "sources", {}).get(impl.plugin_name, (impl.plugin_name, ""))[0]
                impl.function(register=lambda name, factory, s=source: registry.add(name, factory, s))
        return registry

    def add(self, name: str, factory: Callable, source: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {source} registered an environment under the name {name!r}; names are "
                              "non-empty strings")
        if not callable(factory):
            raise PluginError(f"plugin {source} registered environment {name!r} as {type(factory).__name__}, not a "
                              "class or function that builds one")
        if name in self.factories:
            raise PluginError(f"environment {name!r} is registered twice: by {self.factories[name][1]} and by {source}")
        self.factories[name] = (factory, source)

    def describe(self, name: str) -> str:
        factory = self.factories[name][0]
        doc = (inspect.getdoc(factory) or "").strip().splitlines()
        return doc[0] if doc else ""

    def select(self, name: str, options: dict, key: str = "method.environment") -> "EnvironmentSpec":
        """The environment `name` with its options validated: a ConfigError (one line) for an unknown name or a
        bad option, before any work."""
        if name not in self.factories:
            known = ", ".join(sorted(self.factories)) or "none"
            raise ConfigError(f"{key}: no environment {name!r}{did_you_mean(name, self.factories)}; registered: "
                              f"{known} (see `alignkit environments`)")
        factory = self.factories[name][0]
        options_class = getattr(factory, "options_class", None)
        if options_class is None:
            if options:
                raise ConfigError(f"method.environment_options: environment {name!r} takes no options (got "
                                  f"{', '.join(sorted(options))})")
            return EnvironmentSpec(name, factory, None)
        try:
            parsed = options_class(**options)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            fields = ", ".join(options_class.model_fields) or "none"
            raise ConfigError(f"method.environment_options.{where}: {first['msg']} (environment {name!r} takes: "
                              f"{fields})") from None
        spec = EnvironmentSpec(name, factory, parsed)
        spec.check()
        return spec


class EnvironmentSpec:
    """A selected environment: builds one instance per episode; its tools' schemas are checked on selection."""

    def __init__(self, name: str, factory: Callable, options) -> None:
        self.name, self.factory, self.options = name, factory, options

    def build(self):
        env = self.factory() if self.options is None else self.factory(self.options)
        for member in ("reset", "step"):
            if not callable(getattr(env, member, None)):
                raise PluginError(f"environment {self.name!r}: {type(env).__name__} has no method {member}(); an "
                                  "environment has reset(row) and step(assistant_message)")
        return env

    @property
    def reward_names(self) -> list[str]:
        return list(getattr(self.factory, "reward_names", ()))

    def check(self) -> None:
        """Every tool of the environment becomes a schema, and every selected tool exists (ConfigError otherwise)."""
        tool_schemas(self.factory, self.options, f"environment {self.name!r}: tool")


def tool_schemas(factory, options, where: str = "tool") -> list[dict]:
    """The schemas of the tools an environment class (or instance) offers with `options`."""
    return [tool_schema(fn, where) for fn in selected_tools(factory, options)]


def selected_tools(factory, options) -> list[Callable]:
    tools = list(getattr(factory, "tools", ()) or ())
    wanted = getattr(options, "tools", None)
    if wanted is None:
        return tools
    by_name = {getattr(fn, "__name__", ""): fn for fn in tools}
    for name in wanted:
        if name not in by_name:
            raise ConfigError(f"method.environment_options.tools: no tool {name!r}{did_you_mean(name, by_name)}; "
                              f"this environment has: {', '.join(sorted(by_name)) or 'none'}")
    return [by_name[name] for name in wanted]


class ToolOptions(BaseModel):
    """The options of a ToolEnvironment (`method.environment_options`)."""

    model_config = ConfigDict(extra="forbid")

    tools: list[str] | None = Field(None, description="The tools offered, by function name (null: all).")
    timeout: float = Field(5.0, gt=0, description="Seconds a tool call may run; past it the model reads an error.")
    max_calls: int = Field(4, gt=0, description="Tool calls run per model turn (later ones are errors).")
    call_reward: float = Field(0.0, description="Reward part tool_call (column env/tool_call): this much for the "
                               "first tool call of an episode that runs without error (0: tool use is not rewarded).")
    describe_tools: bool = Field(True, description="Give the chat template the tools' schemas (tools=) in the "
                                 "prompt; false: the model knows them from training (shorter prompts).")


class ToolEnvironment:
    """An environment of plain Python functions (subclass it and list them in `tools`). Each model turn's tool calls
    are run, their results returned as `tool` messages; a turn without a tool call ends the episode. Its reward part
    `tool_call` is `call_reward` for the episode's first call that ran without error (0 by default). Counts per
    episode: `calls`, `well_formed` (parsed and naming a tool) and `errors` (malformed, unknown tool, raised, timed
    out or non-text)."""

    tools: tuple = ()
    options_class = ToolOptions
    reward_names: tuple = ("tool_call",)
    convention = QWEN

    def __init__(self, options: ToolOptions | None = None) -> None:
        self.options = options or self.options_class()
        self.functions = {fn.__name__: fn for fn in selected_tools(type(self), self.options)}
        self.calls = self.well_formed = self.errors = 0
        self.rewarded = False  # a call ran without error (call_reward is given once)
        self.log: list[str] = []

    @property
    def tool_schemas(self) -> list[dict]:
        """The schemas the chat template gets as `tools=` (none with describe_tools false)."""
        return [tool_schema(fn) for fn in self.functions.values()] if self.options.describe_tools else []

    def reset(self, row: dict) -> Messages:
        prompt = row["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def step(self, message: dict) -> tuple[Messages | None, dict, bool]:
        calls = parse_tool_calls(message.get("content") or "", self.convention)
        if not calls:
            return None, {"tool_call": 0.0}, True
        out, rewarded = [], self.rewarded
        for i, call in enumerate(calls):
            self.calls += 1
            if call.error:
                result = f"error: malformed tool call ({call.error})"
            elif call.name not in self.functions:
                result = f"error: no tool {call.name!r}; tools: {', '.join(self.functions)}"
            elif i >= self.options.max_calls:
                result = f"error: more than {self.options.max_calls} tool calls in one turn"
            else:
                self.well_formed += 1
                ran = run_tool(self.functions[call.name], call.arguments, self.options.timeout)
                result = ran.content
                if ran.error:
                    self.errors += 1
                    self.log.append(f"{call.name}: {ran.error}")
                else:
                    self.rewarded = True
                out.append({"role": "tool", "name": call.name, "content": result})
                continue
            self.errors += 1
            self.log.append(result)
            out.append({"role": "tool", "name": call.name or "unknown", "content": result})
        first = self.rewarded and not rewarded
        return out, {"tool_call": self.options.call_reward if first else 0.0}, False
