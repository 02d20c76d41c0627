"""The OpenAI-compatible layer through the official openai client and raw SSE."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.server.conftest import SMOL, LiveServer

FRANCE = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="ollama", max_retries=0, timeout=120) as client:
        yield client


def sse(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def test_chat_completion_non_streamed(client):
    reply = client.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0)
    assert reply.object == "chat.completion" and reply.model == SMOL
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_completion_streamed_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=SMOL, messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_checklist_25_chat_completions_sse_chunk_order(http):
    body = {
        "model": SMOL,
        "messages": FRANCE,
        "stream": True,
        "max_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-2])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    without = sse(http.post("/v1/chat/completions", json={**body, "stream_options": None}).text)
    assert without[-1] == "[DONE]" and "usage" not in json.loads(without[-2])


def test_openai_options_map_to_native(client):
    a = client.chat.completions.create(model=SMOL, messages=FRANCE, seed=7, max_tokens=6)
    b = client.chat.completions.create(model=SMOL, messages=FRANCE, seed=7, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 6 and a.choices[0].finish_reason == "length"
    cut = client.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0, stop="Paris")
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"


def test_completions(client):
    reply = client.completions.create(model=SMOL, prompt="Name the capital of France.", temperature=0, max_tokens=20)
    assert reply.object == "text_completion" and "Paris" in reply.choices[0].text
    assert reply.usage.completion_tokens > 0
    chunks = list(client.completions.create(model=SMOL, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert SMOL in ids and "gemma3:270m" in ids
    model = client.models.retrieve(SMOL)
    assert model.id == SMOL and model.owned_by == "library" and model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors_use_the_openai_shape(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert e.value.body["message"] == "model 'no-such-model' not found"
    response = http.post("/v1/chat/completions", json={"model": SMOL, "messages": []})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "[] is too short - 'messages'",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert http.post("/v1/chat/completions", content=b"{oops").json()["error"]["type"] == "invalid_request_error"
