"""tp_ollama.server.openai_schemas: /v1 request bodies translated to native requests, field by field as the
spec's table maps them (the replies through the real openai client: test_openai_api.py)."""

from __future__ import annotations

import pytest

from tp_ollama.server.openai_schemas import parse_openai_chat, parse_openai_completion
from tp_ollama.server.schemas import ApiError


def test_openai_chat_maps_fields_per_the_spec_table():
    req, include_usage = parse_openai_chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 5,
            "stop": "x",
            "seed": 3,
            "frequency_penalty": 0.5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert [m.content for m in req.messages] == ["a", "b"]  # one native message per part
    assert req.options == {
        "temperature": 1.0,
        "top_p": 1.0,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.0,
        "num_predict": 5,
        "seed": 3,
        "stop": ["x"],
    }
    assert req.stream and include_usage
    req, include_usage = parse_openai_chat({"model": "m", "messages": [{"role": "user", "content": "a"}]})
    assert not req.stream and not include_usage


def test_openai_completion_takes_a_single_string_prompt():
    req, _ = parse_openai_completion({"model": "m", "prompt": "p", "max_completion_tokens": 2})
    assert req.prompt == "p" and req.options["num_predict"] == 2 and not req.raw
    with pytest.raises(ApiError):
        parse_openai_completion({"model": "m", "prompt": ["a", "b"]})
