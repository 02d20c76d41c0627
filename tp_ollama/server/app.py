"""The HTTP front end: `create_app(engine, models | store=, ...)` builds the whole Starlette app, with
no globals. Routes live in ollama_routes.py, openai_routes.py and (given a model store) store_routes.py;
the text side in text_service.py, and the wire formats in schemas.py and store_schemas.py."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tp_ollama.errors import (
    CheckpointError,
    ConfigError,
    EngineUnavailable,
    ModelNotFound,
    RequestError,
    ServerBusy,
    TpOllamaError,
)
from tp_ollama.server import cluster_routes, embed_routes, ollama_routes, openai_routes, store_routes
from tp_ollama.server.admission import Limits
from tp_ollama.server.compression import GzipMiddleware
from tp_ollama.server.engine_api import Engine
from tp_ollama.server.monitor import EndpointTag, Monitor
from tp_ollama.server.ollama_routes import ClientGone
from tp_ollama.server.openapi import openapi_route
from tp_ollama.server.schemas import ApiError, ModelResolver, json_response, ollama_error, openai_error
from tp_ollama.server.text_service import TextService

if TYPE_CHECKING:
    from tp_ollama.store.model_store import ModelStore

log = logging.getLogger(__name__)


def create_app(
    engine: Engine,
    models: ModelResolver | None = None,
    *,
    store: ModelStore | None = None,
    version: str,
    allowed_origins: Sequence[str] = (),
    max_body_bytes: int = 32 * 1024 * 1024,
    default_num_ctx: int = 4096,
    max_num_ctx: int = 131072,
    max_num_predict: int = 32768,
    keep_alive_s: float = 300.0,
    dtype: str = "auto",
    quant: str = "auto",
    timeout_s: float = 300.0,
    bind_host: str = "127.0.0.1",
    compression: bool = True,
    max_concurrent: int = 4,
    max_queue: int = 512,
    allow_server_paths: bool = False,
) -> Starlette:
    """`store`: the model store; with one, /api/tags, show, create, copy, delete and blobs are mounted
    and generation resolves names through it (`models` is then unused). Without one, `models`
    resolves names and the store routes are absent (404).
    `allowed_origins`: OLLAMA_ORIGINS, added to the default local origins (wildcards allowed).
    `bind_host`: the address the server listens on; on loopback, requests must name a local Host.
    `compression`: gzip whole JSON and text replies of 1 KiB or more for clients that accept it.
    `max_concurrent`: requests holding the model at once per engine group (a ReplicaSet of R groups
    admits R times that); `max_queue`: requests allowed to wait, beyond which a request gets 503.
    `allow_server_paths`: /api/create from a server path for any client, not only loopback ones."""
    resolver = store if store is not None else models
    if resolver is None:
        raise TypeError("create_app needs a model store (store=) or a model resolver (models)")
    # The monitor asks the service (built next) which model is loaded when /metrics is scraped.
    monitor = Monitor(
        loaded_model=lambda: cluster_routes.loaded_name(service),
        replicas=lambda: service.engine.stats(),
        membership=lambda: service.engine.membership(),
    )
    service = TextService(
        engine,
        resolver,
        Limits(
            default_num_ctx=default_num_ctx,
            max_num_ctx=max_num_ctx,
            max_num_predict=max_num_predict,
            keep_alive_s=keep_alive_s,
            dtype=dtype,
            quant=quant,
            timeout_s=timeout_s,
            max_concurrent=max_concurrent,
            max_queue=max_queue,
        ),
        monitor=monitor,
    )

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def api_version(request: Request) -> Response:
        return json_response({"version": version})

    async def ps(request: Request) -> Response:
        return json_response({"models": service.scheduler.running()})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        service.scheduler.close()

    app = Starlette(
        routes=[
            Route("/", root, methods=["GET"]),
            Route("/api/version", api_version, methods=["GET"]),
            Route("/api/ps", ps, methods=["GET"]),
            openapi_route(version),
            *ollama_routes.routes(service, max_body_bytes),
            *openai_routes.routes(service, max_body_bytes),
            *embed_routes.routes(service, max_body_bytes),
            *cluster_routes.routes(service, version),
            *(
                store_routes.routes(store, service.scheduler, max_body_bytes, allow_server_paths)
                if store is not None
                else []
            ),
        ],
        middleware=[
            *([Middleware(GzipMiddleware, minimum_size=1024)] if compression else []),
            Middleware(Cors, origins=[*DEFAULT_ORIGINS, *allowed_origins]),
            Middleware(HostGuard, enabled=_is_loopback(bind_host)),
            Middleware(EndpointTag),
        ],
        exception_handlers={
            HTTPException: _http_error,
            ApiError: _api_error,
            ClientGone: _client_gone,
            TpOllamaError: _tp_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return app


# --- errors --------------------------------------------------------------------------------------


def error_response(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/v1/"):
        return json_response(openai_error(status, message), status)
    return json_response(ollama_error(message), status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status, exc.message)


async def _tp_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ModelNotFound):
        status = 404
    elif isinstance(exc, EngineUnavailable | ServerBusy):
        status = 503
    elif isinstance(exc, CheckpointError | ConfigError):
        status = 500  # the installed model or the server's setup is broken, not the request
    else:
        status = 400  # RequestError and other problems the caller can fix
    if status == 500 or not isinstance(exc, RequestError | ModelNotFound | ServerBusy):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(request, status, str(exc))


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads it; upstream's status for a client that left while its request waited.
    return error_response(request, 499, "request canceled")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return PlainTextResponse("404 page not found", 404)
    if exc.status_code == 405:
        return PlainTextResponse("405 method not allowed", 405)
    return error_response(request, exc.status_code, str(exc.detail))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")


# --- security ------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_host(host_header: str) -> bool:
    """DNS-rebinding guard (upstream's allowedHost): local names and private addresses only."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == socket.gethostname().lower() or host.endswith((".localhost", ".local", ".internal"))
    return ip.is_loopback or ip.is_unspecified or any(ip in net for net in _PRIVATE_NETS)


# Go's netip.Addr.IsPrivate (RFC 1918, RFC 4193); Python's is_private also counts documentation ranges.
_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


class HostGuard:
    """403 for a request whose Host is not local, when the server listens on loopback only."""

    def __init__(self, app: ASGIApp, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.enabled and scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if not allowed_host(host):
                response = json_response(ollama_error(f"host {host!r} is not allowed"), 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for scheme in ("http", "https")
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
ALLOWED_HEADERS = ("authorization", "content-type", "user-agent", "accept", "x-requested-with", "openai-beta")
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


class Cors:
    """CORS with OLLAMA_ORIGINS semantics: glob patterns (`*` matches anything), a 204 preflight,
    and 403 for an Origin that is not allowed (as gin-contrib/cors does upstream)."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        globs = (re.escape(o.strip()).replace(r"\*", ".*") for o in origins if o.strip())
        self._origins = re.compile("^(?:" + "|".join(globs) + ")$", re.IGNORECASE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        origin = headers.get("origin") if headers is not None else None
        if headers is None or origin is None:
            await self.app(scope, receive, send)
            return
        if not self._origins.match(origin):
            await json_response(ollama_error(f"origin {origin!r} is not allowed"), 403)(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin, headers)(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = origin
                out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _preflight(self, origin: str, headers: Headers) -> Response:
        requested = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",")]
        requested = [h for h in requested if h]
        refused = [h for h in requested if h not in ALLOWED_HEADERS and not h.startswith("x-stainless-")]
        if refused:
            return json_response(ollama_error(f"headers not allowed: {', '.join(refused)}"), 403)
        allow: dict[str, Any] = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ", ".join(requested or ALLOWED_HEADERS),
            "Access-Control-Max-Age": "43200",
            "Vary": "Origin",
        }
        return Response(status_code=204, headers=allow)
