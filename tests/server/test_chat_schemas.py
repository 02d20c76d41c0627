"""tp_ollama.server.chat_schemas through the request parsers: `think` and OpenAI's `reasoning_effort`, tools and
earlier tool calls in the shape chat templates read (Hugging Face's), and the 400s for bad values, in upstream's
words (these features end to end: test_thinking.py, test_tools.py)."""

from __future__ import annotations

import json

import pytest

from tests.server.chat_models import WEATHER
from tp_ollama.server.openai_schemas import parse_openai_chat
from tp_ollama.server.schemas import ApiError, parse_chat, parse_generate

PARIS = {"city": "Paris"}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


# --- thinking -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, "low", "medium", "high", "max", None])
def test_think_values(value):
    body = {"model": "m", "prompt": "p", **({} if value is None else {"think": value})}
    assert parse_generate(body).think == value
    assert parse_chat({**body, "messages": ASK}).think == value


@pytest.mark.parametrize("value", ["very", "", 1, ["high"]])
def test_invalid_think_values_are_400_with_upstreams_words(value):
    with pytest.raises(ApiError) as e:
        parse_chat({"model": "m", "messages": ASK, "think": value})
    expected = f'invalid think value: {json.dumps(value)} (must be "high", "medium", "low", "max", true, or false)'
    assert e.value.status == 400 and e.value.message == expected


@pytest.mark.parametrize(
    ("effort", "think"),
    [("none", False), ("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high"), ("max", "max"),
     ("xhigh", "max"), ("ultra", "max"), (None, None)],
)  # fmt: skip
def test_openai_reasoning_effort_maps_to_think(effort, think):
    body = {"model": "m", "messages": ASK}
    assert parse_openai_chat({**body, "reasoning_effort": effort})[0].think == think
    assert parse_openai_chat({**body, "reasoning": {"effort": effort}})[0].think == think
    if effort is not None:
        with pytest.raises(ApiError):
            parse_openai_chat({**body, "reasoning_effort": effort.upper() + "!"})


# --- tools ----------------------------------------------------------------------------------------------


def test_tools_and_earlier_calls_reach_the_template_in_the_hugging_face_shape():
    req = parse_chat(
        {
            "model": "m",
            "tools": [WEATHER],
            "think": False,
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": "",
                    "thinking": "they want weather",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": PARIS}}],
                },
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            ],
        }
    )
    assert req.tools == (WEATHER,) and req.think is False
    assert [m.for_template() for m in req.messages[1:]] == [
        {
            "role": "assistant",
            "content": "",
            "thinking": "they want weather",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": PARIS}}],
        },
        {"role": "tool", "content": "sunny", "name": "get_weather"},
    ]


def test_openai_calls_in_history_have_json_string_arguments_and_results_name_the_call():
    req, _ = parse_openai_chat(
        {
            "model": "m",
            "tools": [WEATHER],
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning": "r",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
        }
    )
    assistant, tool = (m.for_template() for m in req.messages[1:])
    assert assistant == {
        "role": "assistant",
        "content": "",
        "thinking": "r",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}],
    }
    assert tool == {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, None),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
         "invalid tool call arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]}, None),
        ({"tools": [{"type": "retrieval"}]}, None),
        ({"tools": "get_weather"}, None),
    ],
)  # fmt: skip
def test_bad_tools_and_calls_are_400(body, message):
    for parser in (parse_chat, lambda b: parse_openai_chat({"messages": ASK, **b})):
        with pytest.raises(ApiError) as e:
            parser({"model": "m", **body})
        assert e.value.status == 400
        if message:
            assert e.value.message == message
