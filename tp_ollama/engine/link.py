"""Rank 0's end of the channel to whoever sends it requests: the front end over a local socket
(`SocketLink`), or a caller in the same thread (`LocalLink`, for a one-shot generate). The loop
asks a link for the commands that arrived and gives it the replies; the bytes on the wire are
engine/protocol.py's frames."""

from __future__ import annotations

import os
import select
import socket
from collections import deque
from pathlib import Path
from typing import Protocol

import msgspec

from tp_ollama.engine.protocol import Command, FrameBuffer, Reply, decode_command, frame

READ_CHUNK = 1 << 20


class Link(Protocol):
    lost: bool  # the sender went away since the loop last looked; its requests are to be dropped

    @property
    def closed(self) -> bool:
        """No sender will ever come again: the loop ends."""
        ...

    def poll(self, timeout: float) -> list[Command]:
        """Every command that has arrived, waiting up to `timeout` seconds for the first."""
        ...

    def send(self, reply: Reply) -> None: ...


class SocketLink:
    """One front end at a time over a Unix socket. Listens on a path (the front end is another
    process), or takes an already connected socket (a socket pair in one process)."""

    def __init__(self, path: str | None = None, conn: socket.socket | None = None) -> None:
        self.server: socket.socket | None = None
        if path is not None:
            Path(path).unlink(missing_ok=True)
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(path)
            os.chmod(path, 0o600)  # the engine takes orders from this user only
            self.server.listen(1)
        self.conn = conn
        self.frames = FrameBuffer()
        self.lost = False

    @property
    def closed(self) -> bool:
        """A socket pair's other end went away, and nobody can connect again."""
        return self.conn is None and self.server is None

    def poll(self, timeout: float) -> list[Command]:
        payloads = self.frames.pop_all()
        if not payloads and self._wait(timeout):
            self._read()
            payloads = self.frames.pop_all()
        commands = []
        for data in payloads:
            try:
                commands.append(decode_command(data))
            except msgspec.DecodeError:
                self._drop()  # a front end that sends what the protocol does not know is broken
                break
        return commands

    def _wait(self, timeout: float) -> bool:
        if self.conn is None:
            if self.server is None:
                return False
            ready, _, _ = select.select([self.server], [], [], timeout)
            if not ready:
                return False
            self.conn, _ = self.server.accept()
            timeout = 0
        ready, _, _ = select.select([self.conn], [], [], timeout)
        return bool(ready)

    def _read(self) -> None:
        assert self.conn is not None
        while True:
            try:
                data = self.conn.recv(READ_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the front end went away; a new one may connect
                self._drop()
                return
            self.frames.feed(data)
            if len(data) < READ_CHUNK:
                return

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self.frames, self.lost = None, FrameBuffer(), True

    def send(self, reply: Reply) -> None:
        if self.conn is not None:
            try:
                self.conn.sendall(frame(reply))
            except OSError:
                self.conn, self.lost = None, True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.server is not None:
            self.server.close()


class LocalLink:
    """Commands and replies in this process, for a caller that drives the loop itself."""

    def __init__(self) -> None:
        self.inbox: deque[Command] = deque()
        self.outbox: deque[Reply] = deque()
        self.lost = False
        self.closed = False

    def poll(self, timeout: float) -> list[Command]:
        commands = list(self.inbox)
        self.inbox.clear()
        return commands

    def send(self, reply: Reply) -> None:
        self.outbox.append(reply)
