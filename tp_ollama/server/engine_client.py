"""The front end's handle on an engine group: it starts the group (torchrun's agent in a child
process), talks to engine rank 0 over a local socket, and can restart the group while the HTTP server
keeps running. Many requests share the socket at once: every message carries its request's id, and
one reader task hands each reply to the request waiting for it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec

from tp_ollama.engine.host import GroupSpec, HostLauncher
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
    FileRef,
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
from tp_ollama.errors import EngineUnavailable, Regrouped, TpOllamaError
from tp_ollama.launch import free_port
from tp_ollama.membership.coordinator import Formation
from tp_ollama.membership.events import EventLog
from tp_ollama.membership.files import FileServer
from tp_ollama.membership.watch import StoppedWatch, kill_session
from tp_ollama.server.engine_api import LoadedModel, LoadRequest, TokenEvent

log = logging.getLogger(__name__)

CLUSTER_TIMEOUT_S = 10.0  # a group that takes longer to list its ranks is reported from the snapshot
# A group whose connection broke (a rank died) is stopped at once (its agent would take a second or two
# to tear the others down): TERM to its whole session, KILL after this long.
BROKEN_GROUP_GRACE_S = 1.0
WATCH_S = 0.25  # how often the group's processes are checked for a stopped rank
RECOVERY_PAUSE_S = 0.5  # between two attempts to start a group again
STANDBY_AFTER_S = 5.0  # a group's next host is started this long after it connects


class Lost(msgspec.Struct):
    """Not a message of the engine: what a waiting request is handed when the connection ends;
    `planned` when the group was stopped on purpose (it grows: a node joined)."""

    why: str
    planned: bool = False


class Former(Protocol):
    """Forms the engine group of several nodes (tp_ollama.membership.coordinator.Coordinator)."""

    engine: Any
    configured_world_size: int
    generation: int
    nnodes: int
    current: dict[int, int]
    events: EventLog
    files: FileServer

    async def form(self) -> Formation: ...


class EngineClient:
    def __init__(
        self,
        socket_path: Path | None = None,
        spec: GroupSpec | None = None,
        connect_timeout_s: float = 120.0,
        sock: socket.socket | None = None,
        replays: int = 0,
        retry_timeout_s: float = 60.0,
        former: Former | None = None,
        launcher: HostLauncher | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.spec = spec  # this node's part of the group, to (re)start it; None when someone else runs it
        self.launcher = launcher if launcher is not None else HostLauncher(keep_ready=replays > 0)
        # Several nodes: the coordinator forms each group, and this node's part follows the formation.
        self.former = former
        self.world_size = self.configured_world_size = spec.world_size if spec is not None else 0
        if former is not None:
            former.engine = self
            self.configured_world_size = former.configured_world_size
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
        self.retry_timeout_s = retry_timeout_s
        # One log per group: a coordinator's (nodes joining and leaving) is this client's too.
        self.events = former.events if former is not None else EventLog()
        self._why: str | None = None  # why the group was stopped from outside (break_group)
        self._planned = False
        self._recovery: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = StoppedWatch()

    @classmethod
    def spawn(cls, tp: int, comm: str = "auto", device: str = "cpu", tp_weights: str | None = None,
              join_timeout_s: float = 120.0, nnodes: int = 1, master_addr: str = "127.0.0.1",
              master_port: int = 0, max_running: int = 16, kv_cache_bytes: int | None = None,
              prefix_cache: bool = True, replays: int = 0, retry_timeout_s: float = 60.0,
              former: Former | None = None, pp: int = 1, pp_weights: str | None = None,
              strategy: str = "tensor", memory_budget: int = 0) -> EngineClient:  # fmt: skip
        """Start this node's `tp` ranks in a child process session serving a fresh socket. With a
        `former` (several nodes) the group starts when the coordinator has formed it (`begin`),
        and again, at whatever size, whenever it breaks."""
        path = Path(tempfile.mkdtemp(prefix="tp-ollama-")) / "engine.sock"
        spec = GroupSpec(ranks=tuple(range(tp)), world_size=tp * nnodes, master_addr=master_addr,
                         master_port=master_port, socket_path=str(path), comm=comm, device=device,
                         tp_weights=tp_weights, join_timeout_s=join_timeout_s, max_running=max_running,
                         kv_cache_bytes=kv_cache_bytes, prefix_cache=prefix_cache, pp=pp,
                         pp_weights=pp_weights, strategy=strategy, memory_budget=memory_budget)  # fmt: skip
        engine = cls(path, spec, connect_timeout_s=join_timeout_s, replays=replays, retry_timeout_s=retry_timeout_s,
                     former=former)  # fmt: skip
        if former is None:
            engine.start()
        return engine

    def start(self) -> None:
        self._broken = False
        spec = self.spec
        if spec is not None and (self.process is None or self.process.poll() is not None):
            if spec.master_port == 0:  # one node: the store of each group on a port free now
                spec = msgspec.structs.replace(spec, master_port=free_port())
            self.process = self.launcher.start(spec)

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    @property
    def restarts(self) -> bool:
        """Whether this client starts its group again when it dies (fault tolerance is on)."""
        return self.replays > 0 and self.restartable

    def group_running(self) -> bool:
        return self.writer is not None and not self._broken and self.process is not None and not self._exited()

    def begin(self) -> None:
        """Form the group now (several nodes), rather than at the first request."""
        if self.former is not None:
            self._schedule_recovery()

    def break_group(self, why: str, planned: bool = False) -> None:
        """Stop the running (or starting) group at once because of `why` (a node left, a rank hung) or,
        `planned`, to form a larger one. Its requests are replayed on the next group."""
        if self.process is None or self._exited() or self.shutdown_sent:
            return
        log.warning("stopping the engine group: %s", why)
        if not planned:
            self.events.failed(why)
        self._why, self._planned, self._broken = why, planned, True
        kill_session(self.process.pid, signal.SIGKILL)
        if self.writer is None:  # still starting: nobody reads its end; start the next one
            self._schedule_recovery()

    # --- the connection ----------------------------------------------------------------------------

    async def _connect(self) -> None:
        async with self._connecting:
            if self.restartable and self._broken and not self._exited():
                # Its connection broke (a rank died) and the group is still going down: a request now
                # would find its socket closed. Stop what is left of it.
                await asyncio.to_thread(self.terminate, BROKEN_GROUP_GRACE_S)
            if self.restartable and (self._exited() or (self.former is not None and self.process is None)):
                # The group died (a rank crashed or was killed): the front end and its queue stay up,
                # and a fresh group starts, which loads the model again.
                if self.process is not None:
                    log.warning("the engine group exited with status %s; starting it again", self.process.returncode)
                    self._lost(self._why or "the engine group exited (a rank may have died)", self._planned)
                await self._start_group()
            if self.writer is not None:
                return
            if self._sock is not None:
                self.reader, self.writer = await asyncio.open_unix_connection(sock=self._sock, limit=1 << 26)
                self._sock = None
            elif self.socket_path is None:
                raise EngineUnavailable("the in-process engine has stopped; restart the server")
            else:
                await self._open_path()
            self._why, self._planned = None, False
            self._reading = asyncio.get_running_loop().create_task(self._read())
            if self.process is not None:
                # The next group's host, once this group is past its start (importing torch takes a
                # core for a second or two, which the model's load and first steps need now).
                asyncio.get_running_loop().call_later(STANDBY_AFTER_S, self._prepare_standby)
            if self.process is not None and self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _prepare_standby(self) -> None:
        if not self.shutdown_sent and self.restarts:
            self.launcher.prepare()

    @property
    def restartable(self) -> bool:
        return self.spec is not None

    async def _start_group(self) -> None:
        self._broken = False
        if self.former is not None and self.spec is not None:
            f = await self.former.form()
            self.spec = msgspec.structs.replace(
                self.spec,
                ranks=f.ranks,
                world_size=f.world_size,
                master_port=f.master_port,
                tp_weights=f.tp_weights,
                pp=f.pp,
            )
            self.world_size = f.world_size
            self.process = None
        self._stopped.reset()
        self.start()

    async def _watch(self) -> None:
        """A rank of this node's group that is stopped (SIGSTOP) holds every other rank up without
        closing anything: stop the group, as if it had died."""
        while not self.shutdown_sent:
            await asyncio.sleep(WATCH_S)
            process = self.process
            if process is None or process.poll() is not None or self._broken:
                continue
            why = await asyncio.to_thread(self._stopped.check, process.pid)
            if why is not None and process is self.process:
                self.break_group(why)

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
            why, planned = self._why or "the engine closed its connection (a rank may have died)", self._planned
            if self._broken and not planned:
                self.events.failed(why)
            self._lost(why, planned)
            if self._broken and self.restarts:
                self._schedule_recovery()

    def _lost(self, why: str, planned: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self._loaded = None
        for queue in self._pending.values():
            queue.put_nowait(Lost(why, planned))
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
            raise Regrouped(reply.why) if reply.planned else EngineUnavailable(reply.why)
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
        files = [FileRef(name, digest, size) for name, digest, size in request.files]
        if self.former is not None:
            for ref in files:  # what the other nodes' ranks may read from this node
                self.former.files.offer(ref.digest, request.path / ref.name if ref.name else request.path)
        reply = await self._call(
            lambda rid: Load(rid, str(request.path), request.dtype, request.num_ctx, request.quant, files)
        )
        assert isinstance(reply, Loaded)
        info = reply.info
        self._loaded = LoadedModel(
            path=request.path, dtype=request.dtype, num_ctx=request.num_ctx, world_size=info.world_size,
            layout=info.layout, size_bytes=info.size_bytes, quant=request.quant, precision=info.precision,
            files=request.files,
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
        killed, a node left) and this client restarts groups, the answer goes on: a group is formed
        again, the model loaded again, and the request resubmitted with the tokens already given
        (`resumed`: the engine runs them as the decode steps that made them, then goes on), up to
        `replays` times (a group stopped to grow does not count) and within `retry_timeout_s` of the
        failure. The stream has no duplicate and no missing token; with temperature 0 or a seed it is
        the text of a run without the fault (sampling draws depend on the seed and position only, and
        the group keeps its ranks' layout unless told to reshard); a grammar takes the given tokens
        again before it goes on."""
        sent: list[int] = []
        attempt = 0
        while True:
            once = self._generate_once(prompt, options, eos_ids, output_format, sent)
            try:
                async for event in once:
                    if event.token is not None:
                        sent.append(event.token)
                    yield event
                    if event.done:
                        return
                return
            except EngineUnavailable as e:
                planned = isinstance(e, Regrouped)
                if not (self.restarts and self._load_request is not None) or (not planned and attempt >= self.replays):
                    raise
                lost = e
            finally:
                await once.aclose()  # its bookkeeping (active requests, a cancel) runs now, not when collected
            if not planned:
                attempt += 1
            log.warning("%s; replaying a request after %d tokens (attempt %d of %d)", lost, len(sent), attempt,
                        self.replays)  # fmt: skip
            await self._recover_within(self.retry_timeout_s, str(lost))
            self.events.replayed(len(sent), attempt)

    async def _recover(self) -> None:
        """Start the group again and load the model it had (once, for every request replaying)."""
        async with self._recovering:
            await self._connect()
            if self._loaded is None and self._load_request is not None:
                await self.load(self._load_request)
            self.events.recovered(f"serving at world size {self.world_size}", world_size=self.world_size)

    async def _recover_within(self, timeout_s: float, why: str) -> None:
        """_recover, tried again until it works or `timeout_s` has passed (then one clear error)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await asyncio.wait_for(self._recover(), max(0.1, deadline - loop.time()))
                return
            except (EngineUnavailable, TimeoutError) as e:
                last = str(e) or "it did not answer in time"
            if loop.time() + RECOVERY_PAUSE_S >= deadline:
                self.events.add("gave_up", f"{why}; not recovered within {timeout_s:g} s: {last}")
                raise EngineUnavailable(
                    f"the engine group failed ({why}) and did not recover within {timeout_s:g} s "
                    f"(inference.fault_tolerance.retry_timeout): {last}"
                )
            log.warning("the engine group did not start again (%s); trying again", last)
            await asyncio.sleep(RECOVERY_PAUSE_S)

    def _schedule_recovery(self) -> None:
        """Recover in the background, so that a group that broke while idle (or a larger one) is ready
        before the next request comes."""
        if self._recovery is not None and not self._recovery.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._recovery = loop.create_task(self._background_recovery())

    async def _background_recovery(self) -> None:
        first = self.former is not None and self.former.generation == 0
        timeout = 2 * self.connect_timeout_s if first else self.retry_timeout_s
        try:
            await self._recover_within(timeout, self._why or "the engine group stopped")
        except EngineUnavailable as e:
            log.error("%s", e)
        except Exception:
            log.exception("recovering the engine group failed")

    async def _generate_once(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None,
        resumed: list[int],
    ) -> AsyncGenerator[TokenEvent, None]:
        await self._connect()
        rid, queue = self._open_request()
        finished = False
        self.active += 1
        try:
            await self._send(Generate(rid, prompt, options, eos_ids, output_format, list(resumed)))
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
        """Embeddings; a group that dies meanwhile is formed again and asked again, as generate does."""
        attempt = 0
        while True:
            try:
                reply = await self._call(lambda rid: Embed(rid, inputs))
                assert isinstance(reply, Embedded)
                return reply.embeddings
            except EngineUnavailable as e:
                planned = isinstance(e, Regrouped)
                if not (self.restarts and self._load_request is not None) or (not planned and attempt >= self.replays):
                    raise
                attempt += 0 if planned else 1
                await self._recover_within(self.retry_timeout_s, str(e))

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

    def membership(self) -> dict[str, Any]:
        """The group's state for /api/distributed/status: `recovering` while a failed group is being
        formed again, `degraded` while it runs on fewer nodes than configured, else `healthy`."""
        former = self.former
        nodes = 1 + len(former.current) if former is not None else 1
        configured_nodes = former.nnodes if former is not None else 1
        if self.events.recovering or (self.restartable and self._broken):
            state = "recovering"
        elif nodes < configured_nodes or (self.world_size and self.world_size < self.configured_world_size):
            state = "degraded"
        else:
            state = "healthy"
        return {
            "state": state,
            "generation": former.generation if former is not None else self.events.recoveries + 1,
            "world_size": self.world_size,
            "configured_world_size": self.configured_world_size,
            "nodes": nodes,
            "configured_nodes": configured_nodes,
            "counters": self.events.counters(),
        }

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
        for task in (self._watcher, self._recovery):
            if task is not None:
                task.cancel()
        self.request_shutdown()
        self.launcher.close()
        if self.process is not None and self.process.poll() is None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 10)
            except TimeoutError:
                await asyncio.to_thread(self.terminate)
