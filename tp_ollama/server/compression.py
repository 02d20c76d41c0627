"""Gzip for whole (non-streamed) responses: `performance.compression` in the settings.

A response is compressed when the client accepts gzip, the response declares its length (a plain
`Response`: one body message) of at least `minimum_size` bytes, and its type is JSON or text. A
streamed response (NDJSON, SSE) declares no length: its start message goes out untouched at once
and every chunk after it, so a token is never held back waiting for the next. Only a compressible
candidate's start message is held, until its first body message says whether more follows."""

from __future__ import annotations

import asyncio
import gzip

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Bodies at least this big are compressed in a worker thread: gzip runs at ~50 MB/s, and a large
# /api/show or /openapi.json would otherwise stall every stream served by the event loop.
_THREAD_BYTES = 1 << 20


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value allows gzip: `gzip` (or `x-gzip`) with q > 0, or else `*`
    with q > 0. Malformed q values count as 0, the safe reading."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if not coding:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[coding.lower()] = q
    for coding in ("gzip", "x-gzip", "*"):
        if coding in weights:
            return weights[coding] > 0
    return False


def compressible_type(content_type: str) -> bool:
    """JSON (`application/json`, `application/*+json`) or text, but not an SSE stream."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return False
    return media.startswith("text/") or media == "application/json" or media.endswith("+json")


class GzipMiddleware:
    """ASGI middleware: gzip whole JSON and text responses of at least `minimum_size` bytes for
    clients that accept it, with Content-Encoding, the new Content-Length and Vary: Accept-Encoding.
    `level` is gzip's compresslevel (1 fast .. 9 small)."""

    def __init__(self, app: ASGIApp, minimum_size: int = 1024, level: int = 6) -> None:
        if minimum_size < 0:
            raise ValueError(f"minimum_size must be >= 0 bytes, got {minimum_size}")
        if not 1 <= level <= 9:
            raise ValueError(f"gzip level must be 1..9, got {level}")
        self.app = app
        self.minimum_size = minimum_size
        self.level = level

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await self.app(scope, receive, send)
            return
        wanted = accepts_gzip(Headers(scope=scope).get("accept-encoding", ""))
        held: Message | None = None  # the start message of a response that may be compressed

        async def send_maybe_gzipped(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if not self._candidate(Headers(raw=message["headers"])):
                    await send(message)
                    return
                MutableHeaders(scope=message).add_vary_header("Accept-Encoding")
                if not wanted:
                    await send(message)
                    return
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            start, held = held, None
            body: bytes = message.get("body", b"")
            if message.get("more_body", False) or len(body) < self.minimum_size:
                await send(start)  # a body sent in pieces, or shorter than its header said: as is
                await send(message)
                return
            packed = await self._compress(body)
            if len(packed) < len(body):
                headers = MutableHeaders(scope=start)
                headers["Content-Encoding"] = "gzip"
                headers["Content-Length"] = str(len(packed))
                message = {**message, "body": packed}
            await send(start)
            await send(message)

        await self.app(scope, receive, send_maybe_gzipped)

    def _candidate(self, headers: Headers) -> bool:
        length = headers.get("content-length", "")
        return (
            length.isdigit()
            and int(length) >= self.minimum_size
            and "content-encoding" not in headers
            and compressible_type(headers.get("content-type", ""))
        )

    async def _compress(self, body: bytes) -> bytes:
        # mtime=0: the same body always gives the same bytes (ETags, caches, tests).
        if len(body) >= _THREAD_BYTES:
            return await asyncio.to_thread(gzip.compress, body, self.level, mtime=0)
        return gzip.compress(body, self.level, mtime=0)
