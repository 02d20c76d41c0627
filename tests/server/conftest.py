"""One real uvicorn server for the whole tests/server run: LocalEngine over the embedded models,
on a free loopback port, in a thread. `serving` runs any other app the same way."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from tests.local_engine import LocalEngine
from tests.server.doubles import EmbeddedModels
from tp_ollama import __version__
from tp_ollama.server.app import create_app

SMOL = "smollm2:135m"


@dataclass
class LiveServer:
    url: str
    engine: LocalEngine
    app: Starlette


@contextmanager
def serving(app: Starlette, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port of `host` (loopback by default); yields its
    base URL (on the loopback address when `host` is every interface)."""
    # The socket listens before the server thread starts, so clients can connect at once: uvicorn
    # accepts the queued connections as soon as its startup is done. No polling, no sleeps.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", http="h11", loop="asyncio")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        yield f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    engine = LocalEngine()
    app = create_app(engine, EmbeddedModels(), version=__version__, allowed_origins=["chrome-extension://*"])
    with serving(app) as url:
        yield LiveServer(url, engine, app)


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
