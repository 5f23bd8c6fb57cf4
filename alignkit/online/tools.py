"""Tools for multi-turn rollouts: plain Python functions the model calls by writing a tool call in its turn.

A tool is a function with typed parameters and a Google-style docstring; `tool_schema(fn)` turns it into the JSON
schema chat templates take as `tools=` (transformers' `get_json_schema`; a function whose signature cannot become a
schema is a ConfigError naming it). The model's tool calls are parsed from its text by the chat template's
convention (Qwen-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which the built-in tokenizer's
template also describes; a ToolEnvironment's `convention` attribute names another), and run by `run_tool` with a
timeout: a tool that raises, hangs past its timeout or returns anything but text gives an error text for the model
instead (`ToolResult.error`), never a crash. `ToolEnvironment` (alignkit.online.environments) puts these together.
"""

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.errors import ConfigError

#: a convention: (name, opening marker, closing marker); the text between them is one JSON object
#: {"name": str, "arguments": object}
QWEN = ("qwen", "<tool_call>", "</tool_call>")
CONVENTIONS = {QWEN[0]: QWEN}


def tool_schema(fn: Callable, where: str = "tool") -> dict:
    """The chat-template schema of `fn` ({"type": "function", "function": {...}}); a ConfigError (one line, naming
    `fn` and what is missing) when its signature or docstring cannot become one."""
    from transformers.utils import get_json_schema

    name = getattr(fn, "__name__", repr(fn))
    if not callable(fn):
        raise ConfigError(f"{where} {name!r} is {type(fn).__name__}, not a function")
    try:
        return get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where} {name!r} cannot become a tool schema ({reason}); give every parameter a type hint "
                          "and a Google-style docstring with an Args: line per parameter") from None


@dataclass
class ToolCall:
    """One tool call parsed from a model turn: `name` and `arguments`, or `error` (malformed) with the raw text."""

    name: str = ""
    arguments: dict | None = None
    error: str = ""
    raw: str = ""


def parse_tool_calls(text: str, convention: tuple[str, str, str] = QWEN) -> list[ToolCall]:
    """Every tool call in `text` in order. A call whose body is not a JSON object with a string "name" and an object
    "arguments" (or whose closing marker is missing) is a ToolCall with `error` set (not well-formed)."""
    _, start, end = convention
    calls = []
    for match in re.finditer(re.escape(start) + r"(.*?)(" + re.escape(end) + r"|$)", text, re.S):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(ToolCall(error=f"no closing {end}", raw=body))
            continue
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(error=f"not JSON ({e.msg})", raw=body))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(ToolCall(error='not an object with a string "name"', raw=body))
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some templates write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(ToolCall(name=value["name"], error='"arguments" is not an object', raw=body))
            continue
        calls.append(ToolCall(name=value["name"], arguments=arguments, raw=body))
    return calls


@dataclass
class ToolResult:
    """What a tool call gave the model: `content` (text), and `error` (a short reason) when it failed."""

    content: str
    error: str = ""


def run_tool(fn: Callable, arguments: dict, timeout: float) -> ToolResult:
    """`fn(**arguments)` in a daemon thread, waited for at most `timeout` seconds. A tool that raises, runs past the
    timeout (left running in the background) or returns anything but a str is an error result the model reads."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 (any failure of the tool becomes an observation)
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=f"alignkit-tool-{getattr(fn, '__name__', 'tool')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _error(f"timed out after {timeout:g}s")
    if "error" in box:
        e = box["error"]
        return _error(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    value = box.get("value")
    if not isinstance(value, str):
        return _error(f"returned {type(value).__name__}, not text")
    return ToolResult(value)


def _error(reason: str) -> ToolResult:
    return ToolResult(f"error: {reason}", error=reason)
