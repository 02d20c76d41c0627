"""tp_ollama.server.openai_routes on its own: an SSE stream's chunk order (first delta, deltas, finish, usage,
[DONE]), the finish reason and usage of an outcome, and the error event after the 200 (the /v1 routes through
the real openai client: test_openai_api.py)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from tests.server.routes import METRICS, OUTCOME, ScriptedText, collected
from tp_ollama.errors import RequestError
from tp_ollama.server.fields import ApiError
from tp_ollama.server.openai_routes import finish_reason, sse_body, usage_of
from tp_ollama.server.text_service import Outcome
from tp_ollama.text.reply import Piece
from tp_ollama.text.tool_calls import ToolCall

LENGTH = Outcome(replace(METRICS, done_reason="length"), [1])
CALL = ToolCall("get_weather", {"city": "Paris"})


def deltas(piece: Piece, first: bool) -> list[dict[str, Any]]:
    return [{"delta": piece.content, "first": first, "calls": len(piece.tool_calls)}]


def events(service: ScriptedText, include_usage: bool = True) -> list[Any]:
    fns = (deltas, lambda reason: {"finish": reason}, lambda usage: {"usage": usage})
    body = asyncio.run(collected(sse_body(service, None, None, fns, include_usage)))
    assert all(part.startswith(b"data: ") and part.endswith(b"\n\n") for part in body)
    return [part[6:-2].decode() if part == b"data: [DONE]\n\n" else json.loads(part[6:]) for part in body]


def test_the_finish_reason_and_usage_of_an_outcome():
    assert finish_reason(OUTCOME) == "stop" and finish_reason(OUTCOME, tool_calls=True) == "tool_calls"
    assert finish_reason(LENGTH, tool_calls=True) == "length"
    assert usage_of(OUTCOME) == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_chunks_come_as_first_delta_deltas_finish_usage_then_done():
    assert events(ScriptedText([Piece("Hel"), Piece("lo"), OUTCOME])) == [
        {"delta": "Hel", "first": True, "calls": 0},
        {"delta": "lo", "first": False, "calls": 0},
        {"finish": "stop"},
        {"usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
        "[DONE]",
    ]
    assert events(ScriptedText([Piece("a"), LENGTH]), include_usage=False) == [
        {"delta": "a", "first": True, "calls": 0},
        {"finish": "length"},
        "[DONE]",
    ]


def test_an_empty_reply_still_opens_with_a_first_delta_and_a_call_finishes_as_tool_calls():
    assert events(ScriptedText([OUTCOME]), include_usage=False) == [
        {"delta": "", "first": True, "calls": 0},
        {"finish": "stop"},
        "[DONE]",
    ]
    got = events(ScriptedText([Piece("x"), Piece(tool_calls=(CALL,)), OUTCOME]), include_usage=False)
    assert got[1] == {"delta": "", "first": False, "calls": 1} and got[2] == {"finish": "tool_calls"}


def test_an_error_after_the_stream_started_is_its_last_event_in_openais_shape():
    got = events(ScriptedText([Piece("Hel")], error=RequestError("the engine fell over")))
    assert got[0]["delta"] == "Hel" and "[DONE]" not in got
    assert got[-1] == {"error": {"message": "the engine fell over", "type": "api_error", "param": None, "code": None}}
    refused = events(ScriptedText([], error=ApiError(400, "bad")))
    assert refused == [{"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}]
