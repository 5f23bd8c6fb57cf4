"""Tools from plain functions: schemas, tool calls parsed from model text (the built-in template's convention and a
Qwen2-style template), and tools that raise, hang or return non-text becoming error observations."""

import time

import pytest

from alignkit.errors import ConfigError
from alignkit.online.calculator import calculate
from alignkit.online.environments import ToolEnvironment, ToolOptions
from alignkit.online.tools import parse_tool_calls, run_tool, tool_schema

#: Qwen2.5-Instruct's tool rendering, reduced to what matters here (tools in the system turn, <tool_call> in the
#: assistant turn, tool results as <tool_response> in a user turn)
QWEN2_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools>\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_schema_of_a_typed_documented_function():
    schema = tool_schema(calculate)
    assert schema["function"]["name"] == "calculate"
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"


def test_a_function_without_types_or_docstring_is_one_line_naming_it():
    def mystery(x):
        return x

    with pytest.raises(ConfigError, match="tool 'mystery' cannot become a tool schema") as e:
        tool_schema(mystery)
    assert "\n" not in str(e.value)


def test_the_builtin_template_renders_tools_and_results_in_its_own_tool_call_convention(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"}],
                                   tools=[tool_schema(calculate)], tokenize=False, add_generation_prompt=True)
    assert "<tool_call>" in text and "calculate(expression)" in text and "<tool_response>4</tool_response>" in text
    # a model turn written in that convention parses back to the call
    calls = parse_tool_calls('I use it: <tool_call>{"name": "calculate", "arguments": {"expression": "2+2"}}'
                             '</tool_call>')
    assert [(c.name, c.arguments, c.error) for c in calls] == [("calculate", {"expression": "2+2"}, "")]


def test_a_qwen2_style_template_round_trips_its_tool_calls(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "12*3?"}], tools=[tool_schema(calculate)],
                                   tokenize=False, add_generation_prompt=True, chat_template=QWEN2_TEMPLATE)
    assert '"name": "calculate"' in text and text.endswith("<|im_start|>assistant")
    turn = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "12*3"}}\n</tool_call>'
    calls = parse_tool_calls(turn)
    assert [(c.name, c.arguments) for c in calls] == [("calculate", {"expression": "12*3"})]


@pytest.mark.parametrize(("text", "error"), [
    ("<tool_call>{not json}</tool_call>", "not JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'string "name"'),
    ('<tool_call>{"name": "calculate", "arguments": [1]}</tool_call>', '"arguments" is not an object'),
    ('<tool_call>{"name": "calculate", "arguments": {}}', "no closing"),
])
def test_malformed_calls_are_parsed_as_errors(text, error):
    (call,) = parse_tool_calls(text)
    assert error in call.error


def test_text_without_a_call_has_none():
    assert parse_tool_calls("the answer is 4") == []


def test_a_tool_that_raises_hangs_or_returns_non_text_gives_an_error_observation():
    def boom(x: int) -> str:
        raise RuntimeError("kaput")

    def slow(x: int) -> str:
        time.sleep(5)
        return "late"

    def number(x: int) -> str:
        return x

    assert run_tool(boom, {"x": 1}, 1.0).error == "RuntimeError: kaput"
    start = time.time()
    assert run_tool(slow, {"x": 1}, 0.2).error == "timed out after 0.2s"
    assert time.time() - start < 2
    result = run_tool(number, {"x": 1}, 1.0)
    assert result.error == "returned int, not text" and result.content.startswith("error:")
    assert run_tool(calculate, {"expression": "6*7"}, 1.0).content == "42"
    assert run_tool(calculate, {"bogus": "1"}, 1.0).error.startswith("TypeError")


def test_tool_environment_counts_calls_errors_and_ends_on_a_plain_answer():
    def add(a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        return str(a + b)

    def hang(a: int) -> str:
        """Hang.

        Args:
            a: anything
        """
        time.sleep(5)
        return ""

    class Env(ToolEnvironment):
        tools = (add, hang)

    env = Env(ToolOptions(timeout=0.2, call_reward=0.5))
    assert env.reset({"prompt": "1+2?"}) == [{"role": "user", "content": "1+2?"}]
    turn = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>oops</tool_call>'
            '<tool_call>{"name": "hang", "arguments": {"a": 1}}</tool_call>')
    observation, parts, done = env.step({"role": "assistant", "content": turn})
    assert not done and parts == {"tool_call": 0.5}  # the first call that ran
    assert [m["content"] for m in observation][0] == "3"
    assert all(m["role"] == "tool" for m in observation) and len(observation) == 4
    assert "no tool 'nope'" in observation[1]["content"] and "malformed" in observation[2]["content"]
    assert "timed out" in observation[3]["content"]
    assert (env.calls, env.well_formed, env.errors) == (4, 2, 3)
    again = env.step({"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}'
                                                      '</tool_call>'})
    assert again == ([{"role": "tool", "name": "add", "content": "2"}], {"tool_call": 0.0}, False)  # rewarded once
    assert env.step({"role": "assistant", "content": "3"}) == (None, {"tool_call": 0.0}, True)
