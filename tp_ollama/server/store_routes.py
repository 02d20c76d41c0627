"""The model-store routes: GET /api/tags, POST /api/show, POST /api/create, POST /api/copy,
DELETE /api/delete, HEAD and POST /api/blobs/sha256:<hex>, POST /api/pull and POST /api/push.

Every store call that reads or writes files runs in a worker thread. A name that is deleted or made
to mean another model (create or copy over it) is unloaded if it is the loaded one, before the
reply goes out, so that /api/ps never lists a model that no longer exists."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tp_ollama.errors import ModelNotFound, RequestError
from tp_ollama.server.admission import Scheduler
from tp_ollama.server.fields import ApiError
from tp_ollama.server.ollama_routes import error_message
from tp_ollama.server.schemas import NDJSON, json_response, model_field, ndjson_line, ollama_error, read_json
from tp_ollama.server.store_schemas import (
    CreateRequest,
    blob_digest,
    display_name,
    layer_line,
    parse_copy,
    parse_create,
    parse_show,
    parse_transfer,
    status_line,
    tags_body,
)

if TYPE_CHECKING:
    from tp_ollama.store.create import Progress
    from tp_ollama.store.model_store import ModelStore

log = logging.getLogger(__name__)

# Where a route's work sends its NDJSON status objects ({"status", "digest"?, "total"?, ...}).
Say = Callable[[dict[str, Any]], None]

# Blob uploads reach the disk in pieces of about this size: a few thread hops per MiB, and never
# more than this much of a (many GiB) upload in memory.
_BLOB_WRITE_BYTES = 1 << 20


def routes(
    store: ModelStore, scheduler: Scheduler, max_body_bytes: int, allow_server_paths: bool = False
) -> list[Route]:
    """`max_body_bytes` limits the JSON bodies; blob uploads are weights and have no limit."""

    async def tags(request: Request) -> Response:
        return json_response(tags_body(await asyncio.to_thread(store.list)))

    async def show(request: Request) -> Response:
        req = parse_show(await read_json(request, max_body_bytes))
        return json_response(await asyncio.to_thread(store.show, req.model, req.verbose))

    async def create(request: Request) -> Response:
        req = parse_create(await read_json(request, max_body_bytes))
        if isinstance(req.from_, Path) and not allow_server_paths and not _loopback(request):
            raise ApiError(
                403,
                "'from' names a path on the server, which only clients on this machine may create from "
                "(unless models.allow_server_paths is set); upload the file as a blob first "
                "(POST /api/blobs/sha256:<digest>, as `ollama create` does) and name it in 'files'",
            )

        def work(say: Say) -> None:
            _create(store, req, lambda status: say(status_line(status)))

        async def after() -> None:
            await scheduler.forget(display_name(req.model))

        return await _respond(work, req.stream, after, "create")

    async def pull(request: Request) -> Response:
        """A name in the store (or a deleted embedded model, which comes back) "pulls" at once: its
        layers are reported complete. Any other name is fetched from its registry (tp_ollama.store.
        registry), with each layer's progress; a model the registry does not have is 404 (an
        {"error"} line once streaming), a failed transfer names the registry, model and layer."""
        req = parse_transfer(await read_json(request, max_body_bytes))
        return await _respond(lambda say: _pull(store, req.model, req.insecure, say), req.stream, _nothing, "pull")

    async def push(request: Request) -> Response:
        """A name not in the store: 404 `model "NAME" not found` (an {"error"} line after `retrieving
        manifest` once streaming). A name in the store is uploaded to the registry its name holds."""
        req = parse_transfer(await read_json(request, max_body_bytes))
        return await _respond(lambda say: _push(store, req.model, req.insecure, say), req.stream, _nothing, "push")

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
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/push", push, methods=["POST"]),
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


def _pull(store: ModelStore, name: str, insecure: bool, say: Say) -> None:
    """Upstream's progress lines: `pulling manifest`, `pulling <hex12>` with each layer's total and
    completed bytes as they arrive, `verifying sha256 digest`, `writing manifest`, `success`."""
    store.pull(
        name,
        insecure=insecure,
        status=lambda s: say(status_line(s)),
        layer=lambda digest, total, done: say(layer_line("pulling", digest, total, done)),
    )


def _push(store: ModelStore, name: str, insecure: bool, say: Say) -> None:
    """Upstream's lines: `retrieving manifest`, `pushing <hex12>` with each layer's progress, `pushing
    manifest`, `success`."""
    store.push(
        name,
        insecure=insecure,
        status=lambda s: say(status_line(s)),
        layer=lambda digest, total, done: say(layer_line("pushing", digest, total, done)),
    )


def _loopback(request: Request) -> bool:
    """Whether the client is on this machine: a loopback address, or a Unix socket (no address)."""
    if request.client is None:
        return True
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


async def _nothing() -> None:
    pass


async def _respond(
    work: Callable[[Say], None], stream: bool, after: Callable[[], Awaitable[None]], what: str
) -> Response:
    """`work`'s status objects as an NDJSON stream, or (stream false) its last one as the reply; an
    error before the stream is an HTTP error (ModelNotFound 404, RequestError 400...)."""
    if stream:
        return StreamingResponse(_progress(work, after, what), media_type=NDJSON)
    lines: list[dict[str, Any]] = []
    await asyncio.to_thread(work, lines.append)
    await after()
    return json_response(lines[-1] if lines else status_line("success"))


async def _progress(
    work: Callable[[Say], None], after: Callable[[], Awaitable[None]], what: str
) -> AsyncIterator[bytes]:
    """`work`'s status objects as NDJSON while it runs in a thread; an error becomes a final
    {"error"} line. Its last line ("success") is held back until `after` has run, so that a client
    who sees it also sees the result everywhere (/api/ps included)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: the work has ended

    def say(line: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(lines.put_nowait, line)

    def run() -> None:
        try:
            work(say)
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    task = asyncio.ensure_future(asyncio.to_thread(run))
    # A client that goes away does not stop the work (the store finishes or cleans up); its
    # outcome is still logged.
    task.add_done_callback(lambda t: _log_failure(t, what))
    held: dict[str, Any] | None = None
    try:
        while (line := await lines.get()) is not None:
            if held is not None:
                yield ndjson_line(held)
            held = line
        await task
    except Exception as e:
        if held is not None:
            yield ndjson_line(held)
        yield _error_line(e, what)
        return
    try:
        await after()
    except Exception as e:  # the model is in place, but the old one could not be unloaded
        yield _error_line(e, what)
        return
    if held is not None:
        yield ndjson_line(held)


def _error_line(e: Exception, what: str) -> bytes:
    if isinstance(e, ModelNotFound | RequestError):
        log.info("%s failed after the stream started: %s", what, e)
    else:
        log.warning("%s failed after the stream started: %s", what, e)
    return ndjson_line(ollama_error(error_message(e)))


def _log_failure(task: asyncio.Future[None], what: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("%s ended with an error: %s", what, task.exception())


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
