"""The front end's handle on a tensor-parallel engine group: it starts the group (torchrun's agent in
a child process), talks to engine rank 0 over a local socket, and can restart the group while the
HTTP server keeps running."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tp_ollama.engine.options import GenerationOptions
from tp_ollama.errors import EngineUnavailable, TpOllamaError
from tp_ollama.server.engine_api import LoadedModel, LoadRequest, OutputFormat, TokenEvent

log = logging.getLogger(__name__)

CLUSTER_TIMEOUT_S = 10.0  # a group that takes longer to list its ranks is reported from the snapshot


class RemoteEngine:
    def __init__(self, socket_path: Path, command: list[str] | None = None, connect_timeout_s: float = 120.0):
        self.socket_path = socket_path
        self.command = command  # how to (re)start the group; None when someone else runs it
        self.connect_timeout_s = connect_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()  # one request at a time on the socket
        self._loaded: LoadedModel | None = None
        self._snapshot: dict[str, Any] = {"world_size": 0, "ranks": [], "as_of": 0.0}
        self.active = 0  # requests in the engine right now (0 or 1)

    @classmethod
    def spawn(cls, tp: int, comm: str = "auto", device: str = "cpu", tp_weights: str | None = None,
              join_timeout_s: float = 120.0, nnodes: int = 1, master_addr: str = "127.0.0.1",
              master_port: int = 0) -> RemoteEngine:  # fmt: skip
        """Start this node's `tp` ranks (node 0 of `nnodes`) in a child process group serving a fresh
        socket; with several nodes the others join through `tp-ollama launch --node-rank R`."""
        path = Path(tempfile.mkdtemp(prefix="tp-ollama-")) / "engine.sock"
        cmd = [sys.executable, "-m", "tp_ollama", "engine", "--socket", str(path), "--tp", str(tp),
               "--comm", comm, "--device", device, "--join-timeout", str(join_timeout_s),
               "--nnodes", str(nnodes), "--node-rank", "0", "--master-addr", master_addr,
               "--master-port", str(master_port)]  # fmt: skip
        if tp_weights:
            cmd += ["--tp-weights", tp_weights]
        engine = cls(path, cmd, connect_timeout_s=join_timeout_s)
        engine.start()
        return engine

    def start(self) -> None:
        if self.command is not None and (self.process is None or self.process.poll() is not None):
            # Its own session, so stopping it takes every rank with it and nothing else.
            self.process = subprocess.Popen(self.command, start_new_session=True)

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    async def _connect(self) -> None:
        if self.command is not None and self._exited():
            # The group died (a rank crashed or was killed): the front end and its queue stay up,
            # and the next request starts a fresh group, which loads the model again.
            log.warning("the engine group exited with status %s; starting it again", self.process.returncode)  # type: ignore[union-attr]
            if self.writer is not None:
                self.writer.close()
            self.reader = self.writer = None
            self._loaded = None
            self.start()
        if self.writer is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise EngineUnavailable(f"the engine exited with status {self.process.returncode} while starting")
            try:
                self.reader, self.writer = await asyncio.open_unix_connection(str(self.socket_path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise EngineUnavailable(
                        f"the engine did not open {self.socket_path} within {self.connect_timeout_s:g} s"
                    ) from None
                await asyncio.sleep(0.05)

    async def _send(self, obj: dict[str, Any]) -> None:
        assert self.writer is not None
        try:
            self.writer.write(json.dumps(obj).encode() + b"\n")
            await self.writer.drain()
        except OSError:
            self.reader = self.writer = None
            self._loaded = None
            raise EngineUnavailable("the engine's socket is gone (a rank may have died)") from None

    async def _recv(self) -> dict[str, Any]:
        assert self.reader is not None
        try:
            line = await self.reader.readline()
        except OSError:
            line = b""
        if not line:
            self.reader = self.writer = None
            self._loaded = None
            raise EngineUnavailable("the engine closed its connection (a rank may have died)")
        return dict(json.loads(line))

    async def _call(self, obj: dict[str, Any]) -> dict[str, Any]:
        # Shielded: a caller that gives up (a client gone, a timeout) must not leave the reply unread
        # on the socket, where the next command would take it for its own. The command finishes and
        # its reply is dropped; the lock keeps the next one waiting until then.
        reply = await asyncio.shield(self._exchange(obj))
        if "error" in reply:
            raise TpOllamaError(reply["error"])
        return reply

    async def _exchange(self, obj: dict[str, Any]) -> dict[str, Any]:
        async with self.lock:
            await self._connect()
            await self._send(obj)
            return await self._recv()

    async def load(self, request: LoadRequest) -> LoadedModel:
        reply = await self._call({"op": "load", "path": str(request.path), "dtype": request.dtype,
                                  "num_ctx": request.num_ctx})  # fmt: skip
        self._loaded = LoadedModel(
            path=request.path, dtype=request.dtype, num_ctx=request.num_ctx, world_size=reply["world_size"],
            layout=reply["layout"], size_bytes=reply["size_bytes"],
        )  # fmt: skip
        return self._loaded

    async def unload(self) -> None:
        await self._call({"op": "unload"})
        self._loaded = None

    def loaded(self) -> LoadedModel | None:
        return None if self._exited() else self._loaded

    async def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None = None,
    ) -> AsyncIterator[TokenEvent]:
        async with self.lock:
            await self._connect()
            fmt = output_format.to_data() if output_format is not None else None
            await self._send({"op": "generate", "ids": prompt, "options": asdict(options), "eos": sorted(eos_ids),
                              "format": fmt})  # fmt: skip
            self.active += 1
            finished = False
            try:
                while True:
                    msg = await self._recv()
                    if "error" in msg:
                        finished = True
                        raise TpOllamaError(msg["error"])
                    if msg.get("done"):
                        finished = True
                        msg.pop("done")
                        yield TokenEvent(token=None, done=True, **msg)
                        return
                    yield TokenEvent(token=int(msg["token"]))
            finally:
                if not finished and self.writer is not None:
                    # The consumer left early: stop the group at its next step and drain the reply
                    # stream so the socket is clean for the next request.
                    await asyncio.shield(self._cancel_and_drain())
                self.active -= 1

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        reply = await self._call({"op": "embed", "inputs": inputs})
        return list(reply["embeddings"])

    async def cluster(self) -> dict[str, Any]:
        """Fresh facts from every rank when the group is free; while a request holds it (or it is
        down), the last snapshot, with `alive` false on every rank if the group has exited."""
        if not self.lock.locked() and not self._exited():
            try:
                reply = await asyncio.wait_for(self._call({"op": "cluster"}), CLUSTER_TIMEOUT_S)
                reply.pop("ok", None)
                self._snapshot = reply
            except (TimeoutError, TpOllamaError) as e:
                log.warning("the engine did not report its ranks: %s", e)
        snapshot = dict(self._snapshot)
        if self._exited() or self.writer is None:
            snapshot["ranks"] = [{**r, "alive": False} for r in snapshot.get("ranks", [])]
        return snapshot

    async def _cancel_and_drain(self) -> None:
        try:
            await self._send({"op": "cancel"})
            while True:
                msg = await self._recv()
                if msg.get("done") or "error" in msg:
                    return
        except EngineUnavailable:
            return

    def terminate(self, grace_s: float = 5.0) -> None:
        """Stop the engine group's whole process session, whatever state it is in (a second Ctrl-C,
        a crashed front end): TERM, then KILL after `grace_s`."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                continue

    async def close(self) -> None:
        if self.writer is not None:
            try:
                await self._send({"op": "shutdown"})
            except OSError:
                pass
            self.writer.close()
            self.reader = self.writer = None
        if self.process is not None and self.process.poll() is None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 10)
            except TimeoutError:
                await asyncio.to_thread(self.terminate)
