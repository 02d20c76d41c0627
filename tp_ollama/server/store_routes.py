"""The model-store routes: GET /api/tags, POST /api/show, POST /api/create, POST /api/copy,
DELETE /api/delete, HEAD and POST /api/blobs/sha256:<hex>.

Every store call that reads or writes files runs in a worker thread. A name that is deleted or made
to mean another model (create or copy over it) is unloaded if it is the loaded one, before the
reply goes out, so that /api/ps never lists a model that no longer exists."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tp_ollama.errors import RequestError
from tp_ollama.server.ollama_routes import error_message
from tp_ollama.server.schemas import NDJSON, json_response, model_field, ndjson_line, ollama_error, read_json
from tp_ollama.server.store_schemas import (
    CreateRequest,
    blob_digest,
    display_name,
    parse_copy,
    parse_create,
    parse_show,
    status_line,
    tags_body,
)
from tp_ollama.server.text import Scheduler

if TYPE_CHECKING:
    from tp_ollama.store.registry import ModelStore, Progress

log = logging.getLogger(__name__)

# Blob uploads reach the disk in pieces of about this size: a few thread hops per MiB, and never
# more than this much of a (many GiB) upload in memory.
_BLOB_WRITE_BYTES = 1 << 20


def routes(store: ModelStore, scheduler: Scheduler, max_body_bytes: int) -> list[Route]:
    """`max_body_bytes` limits the JSON bodies; blob uploads are weights and have no limit."""

    async def tags(request: Request) -> Response:
        return json_response(tags_body(await asyncio.to_thread(store.list)))

    async def show(request: Request) -> Response:
        req = parse_show(await read_json(request, max_body_bytes))
        return json_response(await asyncio.to_thread(store.show, req.model, req.verbose))

    async def create(request: Request) -> Response:
        req = parse_create(await read_json(request, max_body_bytes))

        def work(say: Progress) -> None:
            _create(store, req, say)

        async def after() -> None:
            await scheduler.forget(display_name(req.model))

        if req.stream:
            return StreamingResponse(_progress(work, after), media_type=NDJSON)
        await asyncio.to_thread(work, lambda status: None)
        await after()
        return json_response(status_line("success"))

    async def copy(request: Request) -> Response:
        source, destination = parse_copy(await read_json(request, max_body_bytes))
        await asyncio.to_thread(store.copy, source, destination)
        await scheduler.forget(display_name(destination))
        return Response(status_code=200)

    async def delete(request: Request) -> Response:
        name = model_field(await read_json(request, max_body_bytes))
        await asyncio.to_thread(store.delete, name)
        await scheduler.forget(display_name(name))
        return Response(status_code=200)

    async def head_blob(request: Request) -> Response:
        digest = blob_digest(request.path_params["digest"])
        return Response(status_code=200 if await asyncio.to_thread(store.has_blob, digest) else 404)

    async def upload_blob(request: Request) -> Response:
        digest = blob_digest(request.path_params["digest"])
        if await asyncio.to_thread(store.has_blob, digest):
            # NOTE: read the body anyway, as the client is still sending it (ollama-python's
            # create_blob does not ask first): a reply mid-upload would break its connection.
            async for _ in request.stream():
                pass
            return Response(status_code=200)
        created = await _receive_blob(store, digest, request.stream())
        return Response(status_code=201 if created else 200)

    return [
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/blobs/{digest}", head_blob, methods=["HEAD"]),
        Route("/api/blobs/{digest}", upload_blob, methods=["POST"]),
    ]


def _create(store: ModelStore, req: CreateRequest, say: Progress) -> None:
    if isinstance(req.from_, Path) and not req.from_.exists():
        raise RequestError(f"{req.from_}: no such file or directory on the server")
    store.create(
        req.model,
        req.from_,
        files=req.files,
        system=req.system,
        template=req.template,
        parameters=req.parameters,
        messages=req.messages,
        license=req.license,
        progress=say,
    )


async def _progress(work: Callable[[Progress], None], after: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """`work`'s status lines as NDJSON while it runs in a thread; an error becomes a final
    {"error"} line. Its last line ("success") is held back until `after` has run, so that a client
    who sees it also sees the result everywhere (/api/ps included)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()  # None: the work has ended

    def say(status: str) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, status)

    def run() -> None:
        try:
            work(say)
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    task = asyncio.ensure_future(asyncio.to_thread(run))
    # A client that goes away does not stop the create (the store finishes or cleans up); its
    # outcome is still logged.
    task.add_done_callback(_log_failure)
    held: str | None = None
    try:
        while (status := await lines.get()) is not None:
            if held is not None:
                yield ndjson_line(status_line(held))
            held = status
        await task
    except Exception as e:
        if held is not None:
            yield ndjson_line(status_line(held))
        yield _error_line(e)
        return
    try:
        await after()
    except Exception as e:  # the model is in place, but the old one could not be unloaded
        yield _error_line(e)
        return
    if held is not None:
        yield ndjson_line(status_line(held))


def _error_line(e: Exception) -> bytes:
    log.warning("create failed after the stream started: %s", e)
    return ndjson_line(ollama_error(error_message(e)))


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("create ended with an error: %s", task.exception())


async def _receive_blob(store: ModelStore, digest: str, body: AsyncIterator[bytes]) -> bool:
    """Stream `body` into blob `digest`; True when the blob is new. 400 on a digest mismatch."""
    writer = await asyncio.to_thread(store.blob_writer, digest)
    try:
        pending: list[bytes] = []
        size = 0
        async for chunk in body:
            pending.append(chunk)
            size += len(chunk)
            if size >= _BLOB_WRITE_BYTES:
                await asyncio.to_thread(writer.write, b"".join(pending))
                pending, size = [], 0
        if pending:
            await asyncio.to_thread(writer.write, b"".join(pending))
        return await asyncio.to_thread(writer.commit)
    except BaseException:
        writer.abort()  # closes and unlinks the partial file; quick, and safe while being cancelled
        raise
