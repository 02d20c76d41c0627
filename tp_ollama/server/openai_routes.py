"""The OpenAI-compatible layer: /v1/chat/completions, /v1/completions, /v1/models. Each request is
translated to a native one (openai_schemas.parse_openai_*), run like /api/chat or /api/generate, and the
output rewritten; errors use OpenAI's shape (see app.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tp_ollama.server.ollama_routes import ClientGone, collect, error_message, unless_disconnected
from tp_ollama.server.openai_schemas import (
    OpenAIIds,
    openai_chat_chunk,
    openai_chat_completion,
    openai_chat_deltas,
    openai_completion,
    openai_model,
    parse_openai_chat,
    parse_openai_completion,
    usage,
)
from tp_ollama.server.schemas import (
    SSE,
    SSE_DONE,
    ApiError,
    ResolvedModel,
    StreamResponse,
    json_response,
    openai_error,
    read_json,
    sse_event,
)
from tp_ollama.server.text_service import Job, Outcome, TextService
from tp_ollama.text.reply import Piece

log = logging.getLogger(__name__)

# (piece of the reply, first?) -> its delta chunks (the first one is never empty);
# (finish_reason) -> finish chunk; (usage) -> usage chunk.
ChunkFns = tuple[
    Callable[[Piece, bool], list[dict[str, Any]]],
    Callable[[str], dict[str, Any]],
    Callable[[dict[str, int]], dict[str, Any]],
]


def finish_reason(outcome: Outcome, tool_calls: bool = False) -> str:
    if outcome.metrics.done_reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def usage_of(outcome: Outcome) -> dict[str, int]:
    return usage(outcome.metrics.prompt_eval_count, outcome.metrics.eval_count)


async def sse_body(
    service: TextService, job: Job, lease: Any, fns: ChunkFns, include_usage: bool
) -> AsyncIterator[bytes]:
    """Chunk order: the first delta (with the role for chat), content deltas, a finish chunk with an
    empty delta, the usage chunk (include_usage only), then [DONE]."""
    deltas, finish, use = fns
    first, called = True, False
    try:
        async for item in service.stream(job, lease):
            if isinstance(item, Outcome):
                if first:
                    for chunk in deltas(Piece(), True):
                        yield sse_event(chunk)
                yield sse_event(finish(finish_reason(item, called)))
                if include_usage:
                    yield sse_event(use(usage_of(item)))
            else:
                for chunk in deltas(item, first):
                    yield sse_event(chunk)
                    first = False
                called = called or bool(item.tool_calls)
    except Exception as e:
        log.warning("generation failed after the stream started: %s", e)
        status = e.status if isinstance(e, ApiError) else 500
        yield sse_event(openai_error(status, error_message(e)))
        return
    yield SSE_DONE


async def run(
    request: Request, service: TextService, job: Job, stream: bool, include_usage: bool, fns: ChunkFns, whole: Any
) -> Response:
    lease = await unless_disconnected(request, service.start(job))  # a client gone frees its queue place
    if stream:
        return StreamResponse(sse_body(service, job, lease, fns, include_usage), SSE, on_close=lease.release)
    try:
        reply, outcome = await unless_disconnected(request, collect(job, service, lease))
    except ClientGone:
        return json_response(openai_error(499, "request canceled"), 499)
    finally:
        lease.release()
    return json_response(whole(reply, finish_reason(outcome, bool(reply.tool_calls)), usage_of(outcome)))


def routes(service: TextService, max_body_bytes: int) -> list[Route]:
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter_ns()
        req, include_usage = parse_openai_chat(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        job = await service.chat_job(req, resolved, started)
        ids = OpenAIIds.new("chatcmpl")

        def deltas(piece: Piece, first: bool) -> list[dict[str, Any]]:
            found = openai_chat_deltas(piece.content, piece.thinking, piece.tool_calls)
            if first:
                found = [{"role": "assistant", **(found[0] if found else {"content": ""})}, *found[1:]]
            return [openai_chat_chunk(ids, req.model, delta) for delta in found]

        fns: ChunkFns = (
            deltas,
            lambda reason: openai_chat_chunk(ids, req.model, {}, reason),
            lambda use: openai_chat_chunk(ids, req.model, None, use=use),
        )

        def whole(reply: Piece, reason: str, use: dict[str, int]) -> dict[str, Any]:
            return openai_chat_completion(ids, req.model, reply.content, reason, use, reply.thinking, reply.tool_calls)

        return await run(request, service, job, req.stream, include_usage, fns, whole)

    async def completions(request: Request) -> Response:
        started = time.perf_counter_ns()
        req, include_usage = parse_openai_completion(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        if not req.prompt:
            raise ApiError(400, "prompt is required")
        job = await service.generate_job(req, resolved, started)
        ids = OpenAIIds.new("cmpl")
        # NOTE: a thinking model's reasoning is dropped here, as upstream's completions layer does.
        fns: ChunkFns = (
            lambda piece, first: (
                [openai_completion(ids, req.model, piece.content, None)] if piece.content or first else []
            ),
            lambda reason: openai_completion(ids, req.model, "", reason),
            lambda use: openai_completion(ids, req.model, None, None, use),
        )

        def whole(reply: Piece, reason: str, use: dict[str, int]) -> dict[str, Any]:
            return openai_completion(ids, req.model, reply.content, reason, use)

        return await run(request, service, job, req.stream, include_usage, fns, whole)

    def model_entry(name: str, resolved: ResolvedModel) -> dict[str, Any]:
        return openai_model(service.display_name(name, resolved), int(resolved.modified_at.timestamp()))

    async def list_models(request: Request) -> Response:
        def entries() -> list[dict[str, Any]]:
            return [model_entry(name, service.models.resolve(name)) for name in service.models.names()]

        return json_response({"object": "list", "data": await asyncio.to_thread(entries)})

    async def retrieve_model(request: Request) -> Response:
        name = request.path_params["model"]
        return json_response(model_entry(name, await service.resolve(name)))

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    ]
