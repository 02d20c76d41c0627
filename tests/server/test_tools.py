"""Tools in chat: /api/chat and /v1/chat/completions end to end through the real ollama and openai clients
(tools and calls in requests: test_chat_schemas.py; the tool-call parser on strings: tests/text/test_tool_calls.py).

What gets rendered runs on the real LocalEngine (a tiny random Qwen3 with a tool-capable template).
A random model never calls a tool by itself: most replies that call one come from the scripted double
(tests/server/doubles.py ScriptedEngine: it emits scripted token ids, which the server decodes with
the model's real tokenizer), and one from the real engine held to a call's JSON Schema by `format`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.server.chat_models import TINY, WEATHER, Served, make_chat_model, serve_local, serve_scripted
from tests.server.conftest import SMOL, LiveServer
from tp_ollama.checkpoints.tokenizer import Tokenizer

CALL_ID = re.compile(r"^call_[a-z0-9]{8}$")
PARIS = {"city": "Paris"}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def scripted(chat_model: Path) -> Iterator[Served]:
    with serve_scripted(chat_model) as served:
        yield served


@pytest.fixture(scope="module")
def local(chat_model: Path) -> Iterator[Served]:
    with serve_local(chat_model) as served:
        yield served


@pytest.fixture
def http(scripted: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=scripted.url, timeout=60) as client:
        yield client


def ollama_at(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=60)


def openai_at(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="ollama", max_retries=0, timeout=60)


def ndjson(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_checklist_10_chat_tool_call_has_arguments_as_an_object(scripted, http):
    scripted.engine.tokens = scripted.script(QWEN_CALL)
    with ollama_at(scripted.url) as client:
        reply = client.chat(TINY, messages=ASK, tools=[WEATHER])
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == PARIS
    assert reply.message.content == "" and reply.done_reason == "stop"

    body = {"model": TINY, "messages": ASK, "tools": [WEATHER], "stream": False}
    (raw,) = http.post("/api/chat", json=body).json()["message"]["tool_calls"]
    assert CALL_ID.match(raw["id"]) and raw["function"] == {"index": 0, "name": "get_weather", "arguments": PARIS}

    lines = ndjson(http.post("/api/chat", json={**body, "stream": True}))
    (with_call,) = [line for line in lines if "tool_calls" in line["message"]]
    assert with_call["done"] is False and with_call["message"]["content"] == ""  # whole, never partial JSON
    assert with_call["message"]["tool_calls"][0]["function"]["arguments"] == PARIS
    assert "".join(line["message"]["content"] for line in lines) == ""
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"


def test_checklist_10_tool_result_in_history_continues_the_conversation(scripted):
    scripted.engine.tokens = scripted.script(QWEN_CALL)
    with ollama_at(scripted.url) as client:
        first = client.chat(TINY, messages=ASK, tools=[WEATHER])
        scripted.engine.tokens = scripted.script("It is sunny in Paris.")
        result = {"role": "tool", "content": "sunny, 24 C", "tool_name": "get_weather"}
        second = client.chat(TINY, messages=[*ASK, first.message, result], tools=[WEATHER])
    assert second.message.content == "It is sunny in Paris." and not second.message.tool_calls
    prompt = scripted.tokenizer.decode(scripted.engine.prompts[-1], skip_special_tokens=False)
    assert QWEN_CALL + "<|im_end|>" in prompt  # the earlier call, rendered by the template
    assert '<tool_response name="get_weather">\nsunny, 24 C\n</tool_response>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_text_before_calls_streams_first_and_calls_are_numbered(scripted, http):
    tokyo = QWEN_CALL.replace("Paris", "Tokyo")
    scripted.engine.tokens = scripted.script(f"Let me check.\n{QWEN_CALL}\n{tokyo}")
    lines = ndjson(http.post("/api/chat", json={"model": TINY, "messages": ASK, "tools": [WEATHER]}))
    first_call = next(i for i, line in enumerate(lines) if "tool_calls" in line["message"])
    assert "".join(line["message"]["content"] for line in lines[:first_call]) == "Let me check."
    calls = [c["function"] for line in lines for c in line["message"].get("tool_calls", [])]
    assert [(c["index"], c["arguments"]["city"]) for c in calls] == [(0, "Paris"), (1, "Tokyo")]


def test_llama_python_tag_is_a_special_token_and_still_read_as_a_call(scripted):
    scripted.engine.tokens = scripted.script(
        '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|python_tag|>"
    )
    with ollama_at(scripted.url) as client:
        reply = client.chat(TINY, messages=ASK, tools=[WEATHER])
    assert [(c.function.name, c.function.arguments) for c in reply.message.tool_calls] == [("get_weather", PARIS)]


def test_calls_that_do_not_parse_or_were_not_asked_for_stay_content(scripted):
    broken = '<tool_call>{"name": oops}</tool_call>'
    with ollama_at(scripted.url) as client:
        scripted.engine.tokens = scripted.script(broken)
        reply = client.chat(TINY, messages=ASK, tools=[WEATHER])
        assert reply.message.content == broken and not reply.message.tool_calls
        scripted.engine.tokens = scripted.script(QWEN_CALL)
        plain = client.chat(TINY, messages=ASK)  # no tools in the request: nothing is parsed
        assert plain.message.content == QWEN_CALL and not plain.message.tool_calls


def test_openai_tool_calls_whole_streamed_and_fed_back(scripted):
    scripted.engine.tokens = scripted.script(QWEN_CALL)
    with openai_at(scripted.url) as client:
        reply = client.chat.completions.create(model=TINY, messages=ASK, tools=[WEATHER])
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == ""
        (call,) = choice.message.tool_calls
        assert CALL_ID.match(call.id) and call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == PARIS  # a JSON string on this API

        chunks = list(client.chat.completions.create(model=TINY, messages=ASK, tools=[WEATHER], stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
            (0, "get_weather", PARIS)
        ]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        scripted.engine.tokens = scripted.script("Sunny.")
        result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
        history = [*ASK, choice.message.model_dump(exclude_none=True), result]
        follow = client.chat.completions.create(model=TINY, messages=history, tools=[WEATHER])
    assert follow.choices[0].message.content == "Sunny." and follow.choices[0].finish_reason == "stop"
    prompt = scripted.tokenizer.decode(scripted.engine.prompts[-1], skip_special_tokens=False)
    assert QWEN_CALL in prompt and '<tool_response name="get_weather">\nsunny' in prompt  # named from the id


def test_a_model_without_tool_support_is_400_with_upstreams_words(server: LiveServer):
    """smollm2:135m's chat template never reads `tools`."""
    message = "registry.ollama.ai/library/smollm2:135m does not support tools"
    body = {"model": SMOL, "messages": ASK, "tools": [WEATHER]}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/api/chat", json=body)
        assert response.status_code == 400 and response.json() == {"error": message}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["message"] == message
        no_tools = http.post("/api/chat", json={**body, "tools": [], "stream": False, "options": {"num_predict": 1}})
        assert no_tools.status_code == 200
    with ollama_at(server.url) as client, pytest.raises(ollama.ResponseError) as e:
        client.chat(SMOL, messages=ASK, tools=[WEATHER])
    assert e.value.status_code == 400 and e.value.error == message


# --- rendering on the real engine -------------------------------------------------------------------


def prompt_tokens(tokenizer: Tokenizer, messages: list[dict], **kwargs: object) -> int:
    """The prompt length transformers' convention gives: what the server must have rendered."""
    text = tokenizer.apply_chat_template(messages, enable_thinking=True, **kwargs)
    return len(tokenizer.encode(text, add_special_tokens=False))


ONE_TOKEN = {"num_predict": 1, "temperature": 0}


def test_tools_are_rendered_into_the_prompt_on_the_real_engine(local):
    with ollama_at(local.url) as client:
        plain = client.chat(TINY, messages=ASK, options=ONE_TOKEN)
        tooled = client.chat(TINY, messages=ASK, tools=[WEATHER], options=ONE_TOKEN)
    assert plain.prompt_eval_count == prompt_tokens(local.tokenizer, ASK)
    assert tooled.prompt_eval_count == prompt_tokens(local.tokenizer, ASK, tools=[WEATHER])
    assert tooled.prompt_eval_count > plain.prompt_eval_count + 50  # the tool's schema is in the prompt
    with openai_at(local.url) as client:
        reply = client.chat.completions.create(model=TINY, messages=ASK, tools=[WEATHER], max_tokens=1)
    assert reply.usage.prompt_tokens == tooled.prompt_eval_count


def test_calls_and_results_in_history_render_on_the_real_engine(local):
    call = {"name": "get_weather", "arguments": PARIS}
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{"function": call}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    with ollama_at(local.url) as client:
        reply = client.chat(TINY, messages=history, tools=[WEATHER], options=ONE_TOKEN)
    hugging_face = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "sunny", "name": "get_weather"},
    ]
    assert reply.prompt_eval_count == prompt_tokens(local.tokenizer, hugging_face, tools=[WEATHER])


CALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Tokyo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}


def test_checklist_10_a_call_made_by_the_real_engine(local):
    """No double: a format schema makes the random model write a call (Llama 3.1's bare JSON form),
    which the server reads out of the text like any other reply."""
    options = {"temperature": 0, "num_predict": 64}
    with ollama_at(local.url) as client:
        reply = client.chat(TINY, messages=ASK, tools=[WEATHER], format=CALL_SCHEMA, think=False, options=options)
        plain = client.chat(TINY, messages=ASK, format=CALL_SCHEMA, think=False, options=options)
    (call,) = reply.message.tool_calls
    assert reply.message.content == "" and call.function.name == "get_weather"
    assert call.function.arguments["city"] in ("Paris", "Tokyo")
    assert json.loads(plain.message.content)["name"] == "get_weather" and not plain.message.tool_calls
    with openai_at(local.url) as client:
        completion = client.chat.completions.create(
            model=TINY,
            messages=ASK,
            tools=[WEATHER],
            reasoning_effort="none",
            response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": CALL_SCHEMA}},
            temperature=0,
            max_tokens=64,
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
