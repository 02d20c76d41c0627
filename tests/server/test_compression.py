"""gzip of whole JSON and text replies (performance.compression): the middleware on its own over small
ASGI apps, then live servers with compression on and off. Streams must pass through untouched and
unbuffered: the gated engine below holds the rest of a stream until the client has read its first
line, so a middleware that buffered would make the read time out."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.server.conftest import SMOL, serving
from tests.server.doubles import EmbeddedModels, ScriptedEngine
from tp_ollama import __version__
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.server.app import create_app
from tp_ollama.server.compression import GzipMiddleware, accepts_gzip, compressible_type
from tp_ollama.server.engine_api import TokenEvent
from tp_ollama.store.model_store import ModelStore

BIG = json.dumps({"text": "tensor parallel " * 200}).encode()  # 3.2 KB of JSON
HELLO = [19556, 905]  # SmolLM2 ids of "Hello world"
WAIT_S = 20  # the longest any step may wait; a buffering middleware turns into a timeout


# --- the middleware alone --------------------------------------------------------------------------


def whole(body: bytes, content_type: str = "application/json") -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def call(app: ASGIApp, accept_encoding: str | None, method: str = "GET") -> tuple[dict[str, str], bytes]:
    """Run `app` behind GzipMiddleware once; the response headers and body as sent."""
    headers = [(b"accept-encoding", accept_encoding.encode())] if accept_encoding is not None else []
    scope = {"type": "http", "method": method, "path": "/", "headers": headers}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(GzipMiddleware(app, minimum_size=1024)(scope, receive, send))
    start, *bodies = sent
    return {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(m.get("body", b"") for m in bodies)


def test_a_big_json_reply_is_gzipped_for_a_client_that_accepts_it():
    headers, body = call(whole(BIG), "deflate, gzip;q=0.5")
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    assert int(headers["content-length"]) == len(body) < len(BIG)
    assert gzip.decompress(body) == BIG


@pytest.mark.parametrize("accept", [None, "", "identity", "gzip;q=0", "br", "*;q=0", "gzip;q=zero"])
def test_no_gzip_unless_the_client_accepts_it(accept):
    headers, body = call(whole(BIG), accept)
    assert "content-encoding" not in headers and body == BIG
    assert headers["vary"] == "Accept-Encoding"  # the reply would differ with another Accept-Encoding


@pytest.mark.parametrize(
    ("body", "content_type", "method"),
    [
        (BIG[:1023], "application/json", "GET"),  # under the 1 KiB threshold
        (BIG, "image/png", "GET"),  # not JSON or text
        (BIG, "text/event-stream", "GET"),
        (BIG, "application/json", "HEAD"),
    ],
)
def test_small_binary_and_head_replies_pass_untouched(body, content_type, method):
    headers, sent = call(whole(body, content_type), "gzip", method)
    assert "content-encoding" not in headers and "vary" not in headers and sent == body


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        *[("gzip", True), ("x-gzip", True), ("*", True), ("br;q=1.0, *;q=0.1", True), ("GZIP ; Q=0.001", True)],
        *[("gzip;q=0, *", False), ("", False), ("deflate, br", False), ("gzip;q=", False)],
    ],
)
def test_accept_encoding_parsing(header, expected):
    assert accepts_gzip(header) is expected


def test_compressible_types():
    assert compressible_type("application/json; charset=utf-8") and compressible_type("application/problem+json")
    assert compressible_type("text/plain; version=0.0.4")
    assert not compressible_type("application/x-ndjson") and not compressible_type("text/event-stream")
    assert not compressible_type("application/octet-stream") and not compressible_type("")


def test_the_first_chunk_of_a_stream_is_not_held_back():
    """The app sends a chunk, then waits until the client has seen it: a middleware that held the
    chunk (to compress a bigger piece) would leave it waiting for ever, here for WAIT_S."""
    seen_first = asyncio.Event()
    sent: list[Message] = []

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": BIG, "more_body": True})
        await asyncio.wait_for(seen_first.wait(), WAIT_S)
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body") == BIG:
            seen_first.set()

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"accept-encoding", b"gzip")]}
    asyncio.run(GzipMiddleware(stream)(scope, receive, send))
    assert [m.get("body") for m in sent[1:]] == [BIG, b"end"]
    assert (b"content-encoding", b"gzip") not in sent[0]["headers"]


def test_a_reply_of_known_length_sent_in_pieces_passes_untouched():
    async def pieces(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(2 * len(BIG)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BIG, "more_body": True})
        await send({"type": "http.response.body", "body": BIG})

    headers, body = call(pieces, "gzip")
    assert "content-encoding" not in headers and body == BIG + BIG
    assert headers["content-length"] == str(2 * len(BIG))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="minimum_size must be >= 0 bytes, got -1"):
        GzipMiddleware(whole(b""), minimum_size=-1)
    with pytest.raises(ValueError, match=r"gzip level must be 1\.\.9, got 10"):
        GzipMiddleware(whole(b""), level=10)


# --- live servers ----------------------------------------------------------------------------------


class GatedEngine(ScriptedEngine):
    """Generates `tokens`, but waits after the first `before` of them until `gate` is set (by the
    test thread, once it has read the first NDJSON line). It waits longer than the client's read
    timeout: if the first line were held back, the client's read would fail first."""

    def __init__(self, tokens: list[int], before: int) -> None:
        super().__init__(tokens)
        self.before = before
        self.gate = threading.Event()

    async def generate(
        self, prompt: list[int], options: GenerationOptions, eos_ids: frozenset[int], output_format: object = None
    ) -> AsyncIterator[TokenEvent]:
        for i, token in enumerate(self.tokens):
            if i == self.before and not await asyncio.to_thread(self.gate.wait, 2 * WAIT_S):
                raise TimeoutError(f"the client did not read the first line within {2 * WAIT_S} s")
            yield TokenEvent(token)
        yield TokenEvent(None, True, "stop", len(prompt), 1000, len(self.tokens), 2000)


def store_app(root: Path, compression: bool) -> Starlette:
    return create_app(ScriptedEngine(HELLO), store=ModelStore(root), version=__version__, compression=compression)


@pytest.fixture(scope="module")
def on(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(store_app(tmp_path_factory.mktemp("on"), True)) as url:
        yield url


@pytest.fixture(scope="module")
def off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(store_app(tmp_path_factory.mktemp("off"), False)) as url:
        yield url


def raw_post(url: str, path: str, body: dict, accept_encoding: str) -> tuple[httpx.Headers, bytes]:
    with (
        httpx.Client(base_url=url, timeout=WAIT_S) as client,
        client.stream("POST", path, json=body, headers={"Accept-Encoding": accept_encoding}) as reply,
    ):
        assert reply.status_code == 200, reply.read()
        return reply.headers, b"".join(reply.iter_raw())


def test_show_is_gzipped_with_accept_encoding_gzip_and_not_without(on):
    headers, packed = raw_post(on, "/api/show", {"model": SMOL}, "gzip")
    assert headers["content-encoding"] == "gzip" and "accept-encoding" in headers["vary"].lower()
    assert int(headers["content-length"]) == len(packed)
    headers, plain = raw_post(on, "/api/show", {"model": SMOL}, "identity")
    assert "content-encoding" not in headers and len(plain) > 1024
    assert gzip.decompress(packed) == plain and json.loads(plain)["model_info"]
    with httpx.Client(base_url=on, timeout=WAIT_S) as client:  # httpx decodes it as any client does
        assert client.get("/api/tags").json()["models"]


def test_compression_off_never_gzips(off):
    headers, plain = raw_post(off, "/api/show", {"model": SMOL}, "gzip")
    assert "content-encoding" not in headers and "vary" not in headers and json.loads(plain)["model_info"]
    with httpx.Client(base_url=off, timeout=WAIT_S, headers={"Accept-Encoding": "gzip"}) as client:
        reply = client.get("/openapi.json")
        assert "content-encoding" not in reply.headers and len(reply.content) > 1024


def test_a_streamed_generate_is_not_compressed_and_its_first_line_comes_at_once():
    engine = GatedEngine([*HELLO, *HELLO], before=2)
    app = create_app(engine, EmbeddedModels(), version=__version__)
    body = {"model": SMOL, "prompt": "Hi", "options": {"temperature": 0}}
    with (
        serving(app) as url,
        httpx.Client(base_url=url, timeout=WAIT_S, headers={"Accept-Encoding": "gzip"}) as client,
        client.stream("POST", "/api/generate", json=body) as reply,
    ):
        assert reply.headers["content-type"] == "application/x-ndjson"
        assert "content-encoding" not in reply.headers and "content-length" not in reply.headers
        lines = reply.iter_lines()
        first = json.loads(next(lines))  # read while the engine is still waiting at the gate
        assert first["done"] is False and first["response"]
        engine.gate.set()
        rest = [json.loads(line) for line in lines]
    assert rest[-1]["done"] is True
    assert "".join(x["response"] for x in [first, *rest]) == "Hello worldHello world"
