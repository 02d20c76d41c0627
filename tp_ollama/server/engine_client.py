"""The front end's handle on an engine group: it starts the group (torchrun's agent in a child
process), talks to engine rank 0 over a local socket, and can restart the group while the HTTP server
keeps running. Many requests share the socket at once: every message carries its request's id, and
one reader task hands each reply to the request waiting for it."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.protocol import (
    Cancel,
    ClusterFacts,
    Command,
    DescribeCluster,
    Done,
    Embed,
    Embedded,
    Failed,
    Generate,
    Load,
    Loaded,
    OutputFormat,
    Reply,
    Shutdown,
    Token,
    Unload,
    decode_reply,
    frame,
    read_frame,
)
from tp_ollama.errors import EngineUnavailable, TpOllamaError
from tp_ollama.server.engine_api import LoadedModel, LoadRequest, TokenEvent

log = logging.getLogger(__name__)

CLUSTER_TIMEOUT_S = 10.0  # a group that takes longer to list its ranks is reported from the snapshot
# A group whose connection broke (a rank died) is stopped at once (its agent would take a second or two
# to tear the others down): TERM to its whole session, KILL after this long.
BROKEN_GROUP_GRACE_S = 1.0


class Lost(msgspec.Struct):
    """Not a message of the engine: what a waiting request is handed when the connection ends."""

    why: str


class EngineClient:
    def __init__(
        self,
        socket_path: Path | None = None,
        command: list[str] | None = None,
        connect_timeout_s: float = 120.0,
        sock: socket.socket | None = None,
        replays: int = 0,
    ) -> None:
        self.socket_path = socket_path
        self.command = command  # how to (re)start the group; None when someone else runs it
        self.connect_timeout_s = connect_timeout_s
        self._sock = sock  # an already connected socket (an engine in this process)
        self.process: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._pending: dict[str, asyncio.Queue[Reply | Lost]] = {}
        self._ids = itertools.count()
        self._loaded: LoadedModel | None = None
        self._snapshot: dict[str, Any] = {"world_size": 0, "ranks": [], "as_of": 0.0}
        self.active = 0  # requests generating in the engine right now
        self.shutdown_sent = False
        self._broken = False  # the connection to the group ended while the group was meant to run
        self.replays = replays  # times one request is resubmitted after its group died (see generate)
        self._load_request: LoadRequest | None = None  # what to load again into a restarted group
        self._recovering = asyncio.Lock()

    @classmethod
    def spawn(cls, tp: int, comm: str = "auto", device: str = "cpu", tp_weights: str | None = None,
              join_timeout_s: float = 120.0, nnodes: int = 1, master_addr: str = "127.0.0.1",
              master_port: int = 0, max_running: int = 16, kv_cache_bytes: int | None = None,
              prefix_cache: bool = True, replays: int = 0) -> EngineClient:  # fmt: skip
        """Start this node's `tp` ranks (node 0 of `nnodes`) in a child process group serving a fresh
        socket; with several nodes the others join through `tp-ollama launch --node-rank R`."""
        path = Path(tempfile.mkdtemp(prefix="tp-ollama-")) / "engine.sock"
        cmd = [sys.executable, "-m", "tp_ollama", "engine", "--socket", str(path), "--tp", str(tp),
               "--comm", comm, "--device", device, "--join-timeout", str(join_timeout_s),
               "--nnodes", str(nnodes), "--node-rank", "0", "--master-addr", master_addr,
               "--master-port", str(master_port), "--max-running", str(max_running)]  # fmt: skip
        if kv_cache_bytes is not None:
            cmd += ["--kv-cache-bytes", str(kv_cache_bytes)]
        if not prefix_cache:
            cmd += ["--no-prefix-cache"]
        if tp_weights:
            cmd += ["--tp-weights", tp_weights]
        engine = cls(path, cmd, connect_timeout_s=join_timeout_s, replays=replays)
        engine.start()
        return engine

    def start(self) -> None:
        self._broken = False
        if self.command is not None and (self.process is None or self.process.poll() is not None):
            # Its own session, so stopping it takes every rank with it and nothing else.
            self.process = subprocess.Popen(self.command, start_new_session=True)

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    # --- the connection ----------------------------------------------------------------------------

    async def _connect(self) -> None:
        async with self._connecting:
            if self.command is not None and self._broken and not self._exited():
                # Its connection broke (a rank died) and the group is still going down: a request now
                # would find its socket closed. Stop what is left of it.
                await asyncio.to_thread(self.terminate, BROKEN_GROUP_GRACE_S)
            if self.command is not None and self._exited():
                # The group died (a rank crashed or was killed): the front end and its queue stay up,
                # and the next request starts a fresh group, which loads the model again.
                log.warning("the engine group exited with status %s; starting it again", self.process.returncode)  # type: ignore[union-attr]
                self._lost("the engine group exited (a rank may have died)")
                self.start()
            if self.writer is not None:
                return
            if self._sock is not None:
                self.reader, self.writer = await asyncio.open_unix_connection(sock=self._sock, limit=1 << 26)
                self._sock = None
            elif self.socket_path is None:
                raise EngineUnavailable("the in-process engine has stopped; restart the server")
            else:
                await self._open_path()
            self._reading = asyncio.get_running_loop().create_task(self._read())

    async def _open_path(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise EngineUnavailable(f"the engine exited with status {self.process.returncode} while starting")
            try:
                self.reader, self.writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 26)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise EngineUnavailable(
                        f"the engine did not open {self.socket_path} within {self.connect_timeout_s:g} s"
                    ) from None
                await asyncio.sleep(0.05)

    async def _read(self) -> None:
        """Hand every reply to the request it names, until the connection ends."""
        reader = self.reader
        assert reader is not None
        try:
            while True:
                data = await read_frame(reader)
                if data is None:
                    break
                reply = decode_reply(data)
                queue = self._pending.get(reply.id)
                if queue is not None:
                    queue.put_nowait(reply)
        except (OSError, ValueError, asyncio.IncompleteReadError, msgspec.DecodeError) as e:
            log.warning("the engine's connection failed: %s", e)
        if self.reader is reader:
            self._broken = not self.shutdown_sent
            self._lost("the engine closed its connection (a rank may have died)")

    def _lost(self, why: str) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self._loaded = None
        for queue in self._pending.values():
            queue.put_nowait(Lost(why))
        self._pending.clear()

    async def _send(self, cmd: Command) -> None:
        if self.writer is None:
            raise EngineUnavailable("the engine's socket is gone (a rank may have died)")
        try:
            self.writer.write(frame(cmd))
            await self.writer.drain()
        except OSError:
            self._broken = not self.shutdown_sent
            self._lost("the engine's socket is gone (a rank may have died)")
            raise EngineUnavailable("the engine's socket is gone (a rank may have died)") from None

    def _open_request(self) -> tuple[str, asyncio.Queue[Reply | Lost]]:
        rid = f"r{next(self._ids)}"
        queue: asyncio.Queue[Reply | Lost] = asyncio.Queue()
        self._pending[rid] = queue
        return rid, queue

    @staticmethod
    def _check(reply: Reply | Lost) -> Reply:
        if isinstance(reply, Lost):
            raise EngineUnavailable(reply.why)
        if isinstance(reply, Failed):
            raise TpOllamaError(reply.error)
        return reply

    async def _call(self, make: Callable[[str], Command]) -> Reply:
        """A control command (made for its request id) and its one reply. A caller that gives up
        leaves nothing behind: the reply, when it comes, finds no one waiting and is dropped."""
        await self._connect()
        rid, queue = self._open_request()
        try:
            await self._send(make(rid))
            return self._check(await queue.get())
        finally:
            self._pending.pop(rid, None)

    # --- the Engine protocol -----------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> LoadedModel:
        self._load_request = request
        reply = await self._call(
            lambda rid: Load(rid, str(request.path), request.dtype, request.num_ctx, request.quant)
        )
        assert isinstance(reply, Loaded)
        info = reply.info
        self._loaded = LoadedModel(
            path=request.path, dtype=request.dtype, num_ctx=request.num_ctx, world_size=info.world_size,
            layout=info.layout, size_bytes=info.size_bytes, quant=request.quant, precision=info.precision,
        )  # fmt: skip
        return self._loaded

    async def unload(self) -> None:
        await self._call(Unload)
        self._loaded = self._load_request = None

    def loaded(self) -> LoadedModel | None:
        return None if self._exited() else self._loaded

    async def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """The request's tokens as the engine makes them. When the group dies mid-answer (a rank was
        killed) and this client restarts groups, the answer goes on: the group is started again, the
        model loaded again, and the request resubmitted as the prefill of its prompt plus the tokens
        already given, for what is left of num_predict, up to `replays` times. The stream has no
        duplicate and no missing token; with temperature 0 or a seed it is the text of a run without
        the fault (sampling draws depend on the seed and position only). Requests with a grammar are
        not replayed (the grammar's state is not rebuilt from given tokens): they end with the error."""
        sent: list[int] = []
        attempt = 0
        while True:
            remaining = options
            if sent and options.num_predict > 0:
                remaining = dataclasses.replace(options, num_predict=options.num_predict - len(sent))
            once = self._generate_once(prompt + sent, remaining, eos_ids, output_format)
            try:
                async for event in once:
                    if event.token is not None:
                        sent.append(event.token)
                        yield event
                        continue
                    if attempt:  # counts as the client asked: its prompt, and every token it got
                        event = dataclasses.replace(event, prompt_eval_count=len(prompt), eval_count=len(sent))
                    yield event
                    return
                return
            except EngineUnavailable as e:
                replayable = self.command is not None and output_format is None and self._load_request is not None
                if attempt >= self.replays or not replayable:
                    raise
                lost = e
            finally:
                await once.aclose()  # its bookkeeping (active requests, a cancel) runs now, not when collected
            attempt += 1
            log.warning("%s; replaying a request after %d tokens (%d of %d)", lost, len(sent), attempt, self.replays)
            await self._recover()

    async def _recover(self) -> None:
        """Start the group again and load the model it had (once, for every request replaying)."""
        async with self._recovering:
            await self._connect()
            if self._loaded is None and self._load_request is not None:
                await self.load(self._load_request)

    async def _generate_once(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None,
    ) -> AsyncGenerator[TokenEvent, None]:
        await self._connect()
        rid, queue = self._open_request()
        finished = False
        self.active += 1
        try:
            await self._send(Generate(rid, prompt, options, eos_ids, output_format))
            while True:
                reply = self._check(await queue.get())
                if isinstance(reply, Done):
                    finished = True
                    s = reply.stats
                    yield TokenEvent(token=None, done=True, done_reason=s.done_reason,
                                     prompt_eval_count=s.prompt_eval_count, prompt_eval_duration=s.prompt_eval_duration,
                                     eval_count=s.eval_count, eval_duration=s.eval_duration,
                                     comm_duration=s.comm_duration)  # fmt: skip
                    return
                assert isinstance(reply, Token)
                yield TokenEvent(token=reply.token)
        finally:
            self.active -= 1
            self._pending.pop(rid, None)
            if not finished and self.writer is not None:
                # The consumer left early: the engine drops the request at its next step. Nothing to
                # wait for; whatever it still sends for this id is dropped by the reader.
                self.writer.write(frame(Cancel(rid)))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        reply = await self._call(lambda rid: Embed(rid, inputs))
        assert isinstance(reply, Embedded)
        return reply.embeddings

    async def cluster(self) -> dict[str, Any]:
        """Fresh facts from every rank (the group answers between two steps); the last snapshot,
        with `alive` false on every rank, when the group is down or does not answer in time."""
        if not self._exited():
            try:
                reply = await asyncio.wait_for(self._call(DescribeCluster), CLUSTER_TIMEOUT_S)
                assert isinstance(reply, ClusterFacts)
                facts: dict[str, Any] = {"world_size": reply.world_size, "ranks": reply.ranks, "as_of": reply.as_of}
                if reply.kv_cache is not None:
                    facts |= {"kv_cache": reply.kv_cache, "running": reply.running, "waiting": reply.waiting}
                self._snapshot = facts
                return dict(facts)
            except (TimeoutError, TpOllamaError) as e:
                log.warning("the engine did not report its ranks: %s", e)
        snapshot = dict(self._snapshot)
        snapshot["ranks"] = [{**r, "alive": False} for r in snapshot.get("ranks", [])]
        return snapshot

    def terminate(self, grace_s: float = 5.0) -> None:
        """Stop the engine group's whole process session, whatever state it is in (a second Ctrl-C,
        a crashed front end): TERM, then KILL after `grace_s`. A group already told to shut down
        first gets `grace_s` to leave by itself, so that ranks on other nodes are told too."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.shutdown_sent:
            try:
                self.process.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
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

    def request_shutdown(self) -> None:
        """Tell the group to stop, without awaiting anything: safe from a task being cancelled (the
        server's Ctrl-C), so that rank 0 can pass the word to ranks on other nodes."""
        writer, self.reader, self.writer = self.writer, None, None
        if self._reading is not None:
            self._reading.cancel()
        if writer is not None:
            try:
                writer.write(frame(Shutdown()))
                self.shutdown_sent = True
            except OSError:
                pass
            writer.close()

    async def close(self) -> None:
        self.request_shutdown()
        if self.process is not None and self.process.poll() is None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 10)
            except TimeoutError:
                await asyncio.to_thread(self.terminate)
