"""The tool-call parser on strings: each format chat templates teach models, fed whole and a few
characters at a time; text that only looks like a call stays content."""

from __future__ import annotations

import re

import pytest

from tp_ollama.text.tool_calls import ToolCallParser

CALL_ID = re.compile(r"^call_[a-z0-9]{8}$")
PARIS = {"city": "Paris"}
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse(text: str, step: int = 0, names: tuple[str, ...] = ("get_weather", "f")) -> tuple[str, list[tuple]]:
    """(content, [(name, arguments)]) of `text` fed whole (step 0) or `step` characters at a time."""
    parser = ToolCallParser(names)
    content, calls = [], []
    for i in range(0, len(text), step or max(len(text), 1)):
        text_part, found = parser.push(text[i : i + (step or len(text))])
        content.append(text_part)
        calls += found
    text_part, found = parser.flush()
    content.append(text_part)
    calls += found
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(CALL_ID.match(c.id) for c in calls) and len({c.id for c in calls}) == len(calls)
    return "".join(content), [(c.name, c.arguments) for c in calls]


FORMATS = {
    "qwen": (QWEN_CALL, "", [("get_weather", PARIS)]),
    "qwen, text and two calls": (
        f'Let me check.\n{QWEN_CALL}\n<tool_call>{{"name": "f", "arguments": {{"x": [1, "}}"]}}}}</tool_call>\n',
        "Let me check.",
        [("get_weather", PARIS), ("f", {"x": [1, "}"]})],
    ),
    "qwen, text between calls": (
        f'a {QWEN_CALL} b <tool_call>{{"name": "f"}}</tool_call>c',
        "a b c",
        [("get_weather", PARIS), ("f", {})],
    ),
    "qwen, arguments as a JSON string": (
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
        "",
        [("f", {"x": 1})],
    ),
    "qwen, closing tag never came": ('<tool_call>{"name": "f", "arguments": {}}', "", [("f", {})]),
    "mistral": (
        '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [("f", {"x": 1}), ("get_weather", PARIS)],
    ),
    "mistral, name[ARGS]": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", PARIS)]),
    "llama, python_tag": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", PARIS)],
    ),
    "llama, bare object": (
        ' \n{"name": "get_weather", "parameters": {"city": "Paris"}}\n',
        "",
        [("get_weather", PARIS)],
    ),
    "bare array": (
        '[{"name": "f", "arguments": {}}, {"name": "f", "arguments": {"y": null}}]',
        "",
        [("f", {}), ("f", {"y": None})],
    ),
    "wrapped as OpenAI writes it": (
        '<tool_call>{"type": "function", "function": {"name": "f"}}</tool_call>',
        "",
        [("f", {})],
    ),
    "plain text": ("The weather is fine, <b>really</b> [sic].", "The weather is fine, <b>really</b> [sic].", []),
}

MALFORMED = [
    '<tool_call>{"name": broken}</tool_call> after',
    "<tool_call>not json at all",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    '<tool_call>{"name": "f"} extra</tool_call>',
    "<tool_call>",
    "[TOOL_CALLS]",
    "[TOOL_CALLS] hello",
    "[TOOL_CALLS]f[ARGS]not json",
    '<|python_tag|>{"name": "f"}',  # a python_tag call carries its parameters
    "<|python_tag|>print('hi')",
    '{"name": "unknown_tool", "parameters": {}}',  # bare JSON must name one of the tools
    '{"name": "f"}',  # and carry arguments
    '{"name": "f", "arguments": {}} and then text',
    'text first {"name": "f", "arguments": {}}',
    '{"answer": 42}',
    "{not json}",
    '{"a": 1}]',
    "[1, 2, 3]",
    "a < b and c <tool",
]


@pytest.mark.parametrize(("text", "content", "calls"), FORMATS.values(), ids=FORMATS.keys())
def test_tool_call_formats(text, content, calls):
    assert parse(text) == (content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), FORMATS.values(), ids=FORMATS.keys())
def test_feeding_char_by_char_gives_the_same_result(text, content, calls):
    for step in (1, 2, 5):
        assert parse(text, step) == (content, calls), step


@pytest.mark.parametrize("text", MALFORMED)
def test_text_that_looks_like_a_call_but_does_not_parse_stays_content(text):
    for step in (0, 1, 3):
        assert parse(text, step) == (text, []), step


def test_text_is_held_back_only_while_it_may_start_a_call():
    parser = ToolCallParser(["f"])
    assert parser.push("Hello") == ("Hello", [])
    assert parser.push(" <tool") == ("", [])  # maybe a marker (and the space before a call is dropped)
    assert parser.push("box> x") == (" <toolbox> x", [])
    assert parser.push(' <tool_call>{"name": "f"') == ("", [])
    content, calls = parser.push("}</tool_call>")
    assert content == "" and [(c.name, c.arguments, c.index) for c in calls] == [("f", {}, 0)]
    assert parser.flush() == ("", [])

    bare = ToolCallParser(["f"])
    assert bare.push('  {"name": "f", ') == ("", [])
    assert bare.push('"arguments": {}}') == ("", [])  # whole, but the reply might go on
    assert [c.name for c in bare.flush()[1]] == ["f"]

    answer = ToolCallParser(["f"])
    assert answer.push('{"name": "f", "arguments": {}}') == ("", [])
    assert answer.push(" is JSON") == ('{"name": "f", "arguments": {}} is JSON', [])  # as soon as it cannot be

    prose = ToolCallParser(["f"])
    assert prose.push("{ x") == ("{ x", [])  # an object starts with a key: never a call
