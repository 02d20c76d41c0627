"""Ollama's native generation routes: POST /api/generate and POST /api/chat."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tp_ollama.errors import TpOllamaError
from tp_ollama.server.admission import Lease
from tp_ollama.server.schemas import (
    NDJSON,
    ApiError,
    StreamResponse,
    chat_chunk,
    generate_chunk,
    json_response,
    load_reply,
    ndjson_line,
    ollama_error,
    parse_chat,
    parse_generate,
    read_json,
)
from tp_ollama.server.text_service import Job, Outcome, TextService
from tp_ollama.text.reply import Piece

log = logging.getLogger(__name__)

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection while its request waited for the model, or while a
    non-streamed reply was being computed (app.py answers 499 `request canceled`, as upstream)."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away (its body has been read already, so the next
    ASGI message can only be the disconnect)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


async def collect(job: Job, service: TextService, lease: Lease) -> tuple[Piece, Outcome]:
    """A whole reply, for stream:false: all its text, thinking and tool calls."""
    pieces: list[Piece] = []
    outcome: Outcome | None = None
    async for item in service.stream(job, lease):
        if isinstance(item, Outcome):
            outcome = item
        else:
            pieces.append(item)
    assert outcome is not None, "the text stream ended without an outcome"
    return Piece.join(pieces), outcome


def error_message(e: Exception) -> str:
    if isinstance(e, ApiError):
        return e.message
    if isinstance(e, TpOllamaError):
        return str(e)
    return f"internal error: {type(e).__name__}: {e}"


async def ndjson_body(
    service: TextService, job: Job, lease: Lease, chunk: Callable[[Piece, Outcome | None], dict[str, Any]]
) -> AsyncIterator[bytes]:
    """Stream chunks; an error after the 200 has gone out becomes a final {"error": ...} line."""
    try:
        async for item in service.stream(job, lease):
            if isinstance(item, Outcome):
                yield ndjson_line(chunk(Piece(), item))
            else:
                yield ndjson_line(chunk(item, None))
    except Exception as e:
        log.warning("generation failed after the stream started: %s", e)
        yield ndjson_line(ollama_error(error_message(e)))


async def run(request: Request, service: TextService, job: Job, stream: bool, chunk: Any) -> Response:
    # Waiting in the queue ends if the client goes away, so that it frees its place there.
    lease = await unless_disconnected(request, service.start(job))
    if stream:
        return StreamResponse(ndjson_body(service, job, lease, chunk), NDJSON, on_close=lease.release)
    try:
        reply, outcome = await unless_disconnected(request, collect(job, service, lease))
    except ClientGone:
        return json_response(ollama_error("request canceled"), 499)
    finally:
        lease.release()
    return json_response(chunk(reply, outcome))


def routes(service: TextService, max_body_bytes: int) -> list[Route]:
    async def generate(request: Request) -> Response:
        started = time.perf_counter_ns()
        req = parse_generate(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        if not req.prompt:
            reason = await unless_disconnected(
                request, service.load_only(req.model, resolved, req.options, req.keep_alive)
            )
            return json_response(load_reply(req.model, reason, chat=False))
        job = await service.generate_job(req, resolved, started)

        def chunk(piece: Piece, outcome: Outcome | None) -> dict[str, Any]:
            if outcome is None:
                return generate_chunk(req.model, piece.content, thinking=piece.thinking)
            context = None if req.raw else outcome.context
            return generate_chunk(req.model, piece.content, outcome.metrics, context, piece.thinking)

        return await run(request, service, job, req.stream, chunk)

    async def chat(request: Request) -> Response:
        started = time.perf_counter_ns()
        req = parse_chat(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        if not req.messages:
            reason = await unless_disconnected(
                request, service.load_only(req.model, resolved, req.options, req.keep_alive)
            )
            return json_response(load_reply(req.model, reason, chat=True))
        job = await service.chat_job(req, resolved, started)

        def chunk(piece: Piece, outcome: Outcome | None) -> dict[str, Any]:
            metrics = outcome.metrics if outcome else None
            return chat_chunk(req.model, piece.content, metrics, piece.thinking, piece.tool_calls)

        return await run(request, service, job, req.stream, chunk)

    return [
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
    ]
