"""A real server for the client commands (uvicorn in a thread) and running them as a user does: real
processes talking HTTP, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

SMOL = "smollm2:135m"
FRANCE = "Name the capital of France."


class ChatRecorder:
    """Keeps every /api/chat request body, to check what the CLI sent (history, /clear)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/chat":
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        await self.app(scope, recording_receive, send)


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    # The socket listens before the thread starts, so clients can connect at once: no polling.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", http="h11", loop="asyncio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@dataclass
class Live:
    host: str  # for OLLAMA_HOST
    recorder: ChatRecorder | None = None
    store: Any = None


def env_for(host: str) -> dict[str, str]:
    return {**os.environ, "OLLAMA_HOST": host, "PYTHONUNBUFFERED": "1"}


def cli(command: list[str], host: str, *args: str, stdin: str = "", cwd: Path | None = None):
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, env=env_for(host), cwd=cwd, timeout=120
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"Error: {message}"], done.stderr
