"""tp_ollama.server.ollama_routes on its own: an NDJSON stream's lines and the error line after the 200, a whole
reply collected, errors worded for clients, and waiting cut short by a client that leaves (/api/generate and
/api/chat through the real clients: test_ollama_api.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request
from starlette.types import Message

from tests.server.routes import OUTCOME, ScriptedText, collected
from tp_ollama.errors import RequestError
from tp_ollama.server.fields import ApiError
from tp_ollama.server.ollama_routes import ClientGone, collect, error_message, ndjson_body, unless_disconnected
from tp_ollama.server.text_service import Outcome
from tp_ollama.text.reply import Piece
from tp_ollama.text.tool_calls import ToolCall


def chunk(piece: Piece, outcome: Outcome | None) -> dict[str, Any]:
    line: dict[str, Any] = {"response": piece.content, "done": outcome is not None}
    if outcome is not None:
        line["eval_count"] = outcome.metrics.eval_count
    return line


def lines(service: ScriptedText) -> list[dict[str, Any]]:
    body = asyncio.run(collected(ndjson_body(service, None, None, chunk)))
    assert all(part.endswith(b"\n") and part.count(b"\n") == 1 for part in body)
    return [json.loads(part) for part in body]


def test_a_stream_is_one_line_per_piece_then_the_final_line():
    got = lines(ScriptedText([Piece("Hel"), Piece("lo"), OUTCOME]))
    assert got == [
        {"response": "Hel", "done": False},
        {"response": "lo", "done": False},
        {"response": "", "done": True, "eval_count": 5},
    ]


def test_an_error_after_the_stream_started_is_its_last_line():
    got = lines(ScriptedText([Piece("Hel")], error=RequestError("the engine fell over")))
    assert got == [{"response": "Hel", "done": False}, {"error": "the engine fell over"}]
    assert lines(ScriptedText([], error=KeyError("x")))[-1] == {"error": "internal error: KeyError: 'x'"}


def test_a_whole_reply_joins_its_pieces_and_keeps_the_outcome():
    call = ToolCall("get_weather", {"city": "Paris"})
    service = ScriptedText([Piece("a", "t"), Piece("b", tool_calls=(call,)), OUTCOME])
    reply, outcome = asyncio.run(collect(None, service, None))
    assert reply == Piece("ab", "t", (call,)) and outcome is OUTCOME


def test_errors_are_worded_for_clients():
    assert error_message(ApiError(400, "bad think value")) == "bad think value"
    assert error_message(RequestError("prompt too long")) == "prompt too long"
    assert error_message(ValueError("boom")) == "internal error: ValueError: boom"


def request_with(messages: list[Message]) -> Request:
    """A request whose body was read: what arrives next is only ever the disconnect (or nothing)."""
    queue: asyncio.Queue[Message] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)
    return Request({"type": "http", "method": "POST", "path": "/api/generate", "headers": []}, queue.get)


def test_work_is_cancelled_when_the_client_leaves_and_its_result_returned_when_it_stays():
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def answer() -> str:
        return "done"

    async def scenario() -> str:
        with pytest.raises(ClientGone):
            await unless_disconnected(request_with([{"type": "http.disconnect"}]), forever())
        assert cancelled.is_set()
        return await unless_disconnected(request_with([]), answer())

    assert asyncio.run(scenario()) == "done"
