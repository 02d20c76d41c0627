"""tp_ollama.server.schemas: request parsing and response building, without a server (OpenAI's bodies:
test_openai_schemas.py; thinking and tools in chat: test_chat_schemas.py)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

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


def test_chunks_are_compact_with_rfc3339_times_and_ns_metrics():
    metrics = Metrics("stop", 10, 1, 3, 4, 5, 6)
    line = ndjson_line(generate_chunk("m", "", metrics, [1, 2]))
    assert line.endswith(b"\n") and b" " not in line and line.count(b"\n") == 1
    chunk = json.loads(line)
    assert chunk["done"] is True and chunk["context"] == [1, 2] and chunk["eval_duration"] == 6
    assert datetime.fromisoformat(chunk["created_at"]).tzinfo is not None
    assert list(chunk)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
