"""Thinking: /api/chat, /api/generate and /v1/chat/completions end to end through the real clients (`think`
and `reasoning_effort` parsed: test_chat_schemas.py; the `<think>` parser on strings: tests/text/test_thinking.py).

The template side runs on the real LocalEngine (a tiny random Qwen3 whose template reads
`enable_thinking`); replies that think come from the scripted double (tests/server/doubles.py
ScriptedEngine: scripted token ids, decoded by the server with the model's real tokenizer)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.server.chat_models import TINY, WEATHER, Served, make_chat_model, serve_local, serve_scripted
from tests.server.conftest import SMOL, LiveServer

ASK = [{"role": "user", "content": "Why is the sky blue?"}]


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
def ollama_client(scripted: Served) -> Iterator[ollama.Client]:
    with ollama.Client(host=scripted.url, timeout=60) as client:
        yield client


def test_chat_and_generate_split_thinking_from_content(scripted, ollama_client):
    scripted.engine.tokens = scripted.script("<think>a</think>b")
    reply = ollama_client.chat(TINY, messages=ASK, think=True)
    assert (reply.message.thinking, reply.message.content) == ("a", "b")
    generated = ollama_client.generate(TINY, "Why?", think=True)
    assert (generated.thinking, generated.response) == ("a", "b")

    scripted.engine.tokens = scripted.script("<think>\nLight scatters.\n</think>\n\nRayleigh scattering.")
    chunks = list(ollama_client.chat(TINY, messages=ASK, stream=True))  # think absent: on for this model
    thinking = [c.message.thinking for c in chunks if c.message.thinking]
    content = [c.message.content for c in chunks if c.message.content]
    assert "".join(thinking) == "Light scatters." and "".join(content) == "Rayleigh scattering."
    last_thought = max(i for i, c in enumerate(chunks) if c.message.thinking)
    assert all(not c.message.content for c in chunks[: last_thought + 1])  # thinking streams first


def test_think_false_leaves_the_reply_alone(scripted, ollama_client):
    scripted.engine.tokens = scripted.script("<think>a</think>b")
    reply = ollama_client.chat(TINY, messages=ASK, think=False)
    assert reply.message.content == "<think>a</think>b" and not reply.message.thinking
    prompt = scripted.tokenizer.decode(scripted.engine.prompts[-1], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False


def test_openai_reasoning_in_message_and_deltas(scripted):
    scripted.engine.tokens = scripted.script("<think>a</think>b")
    with openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="ollama", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model=TINY, messages=ASK, reasoning_effort="high")
        message = reply.choices[0].message.model_dump()
        assert (message["reasoning"], message["content"]) == ("a", "b")
        chunks = list(client.chat.completions.create(model=TINY, messages=ASK, stream=True))
        off = client.chat.completions.create(model=TINY, messages=ASK, reasoning_effort="none")
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    assert deltas[0] == {"role": "assistant", "reasoning": "a"}
    assert deltas[1:] == [{"content": "b"}, {}]  # reasoning and content in separate chunks, then the finish
    assert off.choices[0].message.content == "<think>a</think>b"


def test_thinking_then_a_tool_call(scripted, ollama_client):
    script = '<think>They want weather.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    scripted.engine.tokens = scripted.script(script + "</tool_call>")
    reply = ollama_client.chat(TINY, messages=ASK, tools=[WEATHER], think="low")
    assert reply.message.thinking == "They want weather." and reply.message.content == ""
    assert [(c.function.name, c.function.arguments) for c in reply.message.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]


def test_think_true_and_false_render_differently_on_the_real_engine(local):
    tokenizer = local.tokenizer

    def prompt_tokens(enable: bool) -> int:
        text = tokenizer.apply_chat_template(ASK, enable_thinking=enable)
        return len(tokenizer.encode(text, add_special_tokens=False))

    with ollama.Client(host=local.url, timeout=60) as client:
        on = client.chat(TINY, messages=ASK, think=True, options={"num_predict": 1})
        off = client.chat(TINY, messages=ASK, think=False, options={"num_predict": 1})
        default = client.chat(TINY, messages=ASK, options={"num_predict": 1})
        generate_off = client.generate(TINY, "Why?", think=False, options={"num_predict": 1})
        generate_on = client.generate(TINY, "Why?", think="medium", options={"num_predict": 1})
    assert on.prompt_eval_count == default.prompt_eval_count == prompt_tokens(True)
    assert off.prompt_eval_count == prompt_tokens(False) > on.prompt_eval_count
    assert generate_off.prompt_eval_count > generate_on.prompt_eval_count


def test_think_on_a_model_without_thinking_is_400(server: LiveServer):
    """smollm2:135m's template neither reads enable_thinking nor writes <think>."""
    message = f'"{SMOL}" does not support thinking'
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for think in (True, "high"):
            chat = http.post("/api/chat", json={"model": SMOL, "messages": ASK, "think": think})
            assert chat.status_code == 400 and chat.json() == {"error": message}
        generate = http.post("/api/generate", json={"model": SMOL, "prompt": "hi", "think": "low"})
        assert generate.status_code == 400 and generate.json() == {"error": message}
        openai_body = {"model": SMOL, "messages": ASK, "reasoning_effort": "high"}
        response = http.post("/v1/chat/completions", json=openai_body)
        assert response.status_code == 400 and response.json()["error"]["message"] == message
        off = {"model": SMOL, "messages": ASK, "think": False, "stream": False, "options": {"num_predict": 1}}
        assert http.post("/api/chat", json=off).status_code == 200
