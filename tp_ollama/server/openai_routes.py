"""The OpenAI-compatible layer: /v1/chat/completions, /v1/completions, /v1/models. Each request is
translated to a native one (schemas.parse_openai_*), run like /api/chat or /api/generate, and the
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
from tp_ollama.server.schemas import (
    SSE,
    SSE_DONE,
    ApiError,
    OpenAIIds,
    ResolvedModel,
    StreamResponse,
    json_response,
    openai_chat_chunk,
    openai_chat_completion,
    openai_completion,
    openai_error,
    openai_model,
    parse_openai_chat,
    parse_openai_completion,
    read_json,
    sse_event,
    usage,
)
from tp_ollama.server.text import Job, Outcome, TextService

log = logging.getLogger(__name__)

# (text delta, first delta?) -> chunk; (finish_reason) -> finish chunk; (usage) -> usage chunk.
ChunkFns = tuple[
    Callable[[str, bool], dict[str, Any]],
    Callable[[str], dict[str, Any]],
    Callable[[dict[str, int]], dict[str, Any]],
]


def finish_reason(outcome: Outcome) -> str:
    return "length" if outcome.metrics.done_reason == "length" else "stop"


def usage_of(outcome: Outcome) -> dict[str, int]:
    return usage(outcome.metrics.prompt_eval_count, outcome.metrics.eval_count)


async def sse_body(
    service: TextService, job: Job, lease: Any, fns: ChunkFns, include_usage: bool
) -> AsyncIterator[bytes]:
    """Chunk order: the first delta (with the role for chat), content deltas, a finish chunk with an
    empty delta, the usage chunk (include_usage only), then [DONE]."""
    delta, finish, use = fns
    first = True
    try:
        async for item in service.stream(job, lease):
            if isinstance(item, Outcome):
                if first:
                    yield sse_event(delta("", True))
                yield sse_event(finish(finish_reason(item)))
                if include_usage:
                    yield sse_event(use(usage_of(item)))
            elif item:
                yield sse_event(delta(item, first))
                first = False
    except Exception as e:
        log.warning("generation failed after the stream started: %s", e)
        status = e.status if isinstance(e, ApiError) else 500
        yield sse_event(openai_error(status, error_message(e)))
        return
    yield SSE_DONE


async def run(
    request: Request, service: TextService, job: Job, stream: bool, include_usage: bool, fns: ChunkFns, whole: Any
) -> Response:
    lease = await service.start(job)
    if stream:
        return StreamResponse(sse_body(service, job, lease, fns, include_usage), SSE, on_close=lease.release)
    try:
        text, outcome = await unless_disconnected(request, collect(job, service, lease))
    except ClientGone:
        return json_response(openai_error(499, "request canceled"), 499)
    finally:
        lease.release()
    return json_response(whole(text, finish_reason(outcome), usage_of(outcome)))


def routes(service: TextService, max_body_bytes: int) -> list[Route]:
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter_ns()
        req, include_usage = parse_openai_chat(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        job = await service.chat_job(req, resolved, started)
        ids = OpenAIIds.new("chatcmpl")
        fns: ChunkFns = (
            lambda text, first: openai_chat_chunk(
                ids, req.model, {"role": "assistant", "content": text} if first else {"content": text}
            ),
            lambda reason: openai_chat_chunk(ids, req.model, {}, reason),
            lambda use: openai_chat_chunk(ids, req.model, None, use=use),
        )

        def whole(text: str, reason: str, use: dict[str, int]) -> dict[str, Any]:
            return openai_chat_completion(ids, req.model, text, reason, use)

        return await run(request, service, job, req.stream, include_usage, fns, whole)

    async def completions(request: Request) -> Response:
        started = time.perf_counter_ns()
        req, include_usage = parse_openai_completion(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        if not req.prompt:
            raise ApiError(400, "prompt is required")
        job = await service.generate_job(req, resolved, started)
        ids = OpenAIIds.new("cmpl")
        fns: ChunkFns = (
            lambda text, first: openai_completion(ids, req.model, text, None),
            lambda reason: openai_completion(ids, req.model, "", reason),
            lambda use: openai_completion(ids, req.model, None, None, use),
        )

        def whole(text: str, reason: str, use: dict[str, int]) -> dict[str, Any]:
            return openai_completion(ids, req.model, text, reason, use)

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
