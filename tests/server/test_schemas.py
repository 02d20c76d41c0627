"""Request parsing and response building, without a server."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tp_ollama.server.openai_schemas import parse_openai_chat, parse_openai_completion
from tp_ollama.server.schemas import (
    ApiError,
    Metrics,
    generate_chunk,
    ndjson_line,
    parse_body,
    parse_chat,
    parse_generate,
    parse_keep_alive,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        (-1, -1.0),
        ("0", 0.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("300ms", 0.3),
        ("-1", -1.0),
        ("-1m", -60.0),
        ("2.5s", 2.5),
    ],
)
def test_keep_alive_accepts_numbers_and_go_durations(value, seconds):
    assert parse_keep_alive(value) == pytest.approx(seconds) if seconds is not None else parse_keep_alive(value) is None


@pytest.mark.parametrize("value", ["5 minutes", "m", "", True, [1]])
def test_keep_alive_rejects_other_values(value):
    with pytest.raises(ApiError) as e:
        parse_keep_alive(value)
    assert e.value.status == 400


def test_generate_defaults():
    req = parse_generate({"model": "m", "prompt": "hi"})
    assert (req.stream, req.raw, req.context, req.keep_alive, req.options) == (True, False, None, None, {})


def test_body_errors():
    for raw, message in [(b"", "missing request body"), (b"  \n", "missing request body")]:
        with pytest.raises(ApiError, match=message):
            parse_body(raw)
    with pytest.raises(ApiError, match="JSON object"):
        parse_body(b"[]")


def test_chat_roles_are_lower_cased_and_checked():
    req = parse_chat({"model": "m", "messages": [{"role": "USER", "content": "x"}], "stream": False})
    assert req.messages[0].role == "user" and req.stream is False
    with pytest.raises(ApiError):
        parse_chat({"model": "m", "messages": ["x"]})


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


def test_chunks_are_compact_with_rfc3339_times_and_ns_metrics():
    metrics = Metrics("stop", 10, 1, 3, 4, 5, 6)
    line = ndjson_line(generate_chunk("m", "", metrics, [1, 2]))
    assert line.endswith(b"\n") and b" " not in line and line.count(b"\n") == 1
    chunk = json.loads(line)
    assert chunk["done"] is True and chunk["context"] == [1, 2] and chunk["eval_duration"] == 6
    assert datetime.fromisoformat(chunk["created_at"]).tzinfo is not None
    assert list(chunk)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
