"""The engine a test's front end talks to, in the test's own process: the real serving loop
(engine/loop.py) run by a group of one in a thread and reached through a socket pair, so batching,
cancellation and every command behave as they do with `serve --tp N`. Not a double: only the
transport to a torchrun group is left out. It also records what each request did, as rank 0 saw it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from tp_ollama.engine.link import SocketLink
from tp_ollama.engine.loop import EngineLoop
from tp_ollama.engine.protocol import Cancel, Command, Done, Generate, Reply, Token
from tp_ollama.engine.state import DEFAULT_KV_BYTES, EngineJob, EngineState
from tp_ollama.parallel.comm import SoloComm
from tp_ollama.server.engine_client import EngineClient

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


@dataclass
class RunRecord:
    """What one request did on rank 0."""

    id: str
    prompt_tokens: int
    eval_count: int = 0
    cancelled: bool = False
    eval_count_at_cancel: int | None = None  # tokens already generated when the cancel arrived
    done_reason: str = ""
    finished: bool = False


class RecordingLink(SocketLink):
    """Rank 0's socket link, noting every request's commands and replies as they pass."""

    def __init__(self, conn: socket.socket) -> None:
        super().__init__(conn=conn)
        self.records: dict[str, RunRecord] = {}  # every request since start, in arrival order

    def poll(self, timeout: float) -> list[Command]:
        commands = super().poll(timeout)
        for cmd in commands:
            if isinstance(cmd, Generate):
                self.records[cmd.id] = RunRecord(cmd.id, len(cmd.prompt))
            elif isinstance(cmd, Cancel) and cmd.id in self.records and not self.records[cmd.id].finished:
                record = self.records[cmd.id]
                record.cancelled, record.eval_count_at_cancel = True, record.eval_count
        return commands

    def send(self, reply: Reply) -> None:
        record = self.records.get(reply.id)
        if record is not None and isinstance(reply, Token):
            record.eval_count += 1
        elif record is not None and isinstance(reply, Done):
            record.finished, record.done_reason = True, reply.stats.done_reason
        super().send(reply)


class LocalEngine(EngineClient):
    def __init__(
        self,
        device: str = "cpu",
        max_running: int = 16,
        kv_cache_bytes: int = DEFAULT_KV_BYTES,
        prefix_cache: bool = True,
    ) -> None:
        front, back = socket.socketpair()
        super().__init__(sock=front)
        job = EngineJob(device=device, max_running=max_running, kv_cache_bytes=kv_cache_bytes,
                        prefix_cache=prefix_cache)  # fmt: skip
        self.state = EngineState(job, SoloComm())
        self._link = RecordingLink(back)
        self._thread = threading.Thread(target=self._serve, name="tp-ollama-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            EngineLoop(self.state, self._link).run()
        except Exception:
            log.exception("the in-process engine stopped")
        finally:
            self._link.close()

    @property
    def runs(self) -> list[RunRecord]:
        return list(self._link.records.values())

    def idle(self) -> bool:
        return not self.state.busy()

    def wait_idle(self, timeout: float) -> bool:
        """From another thread: wait until no request is queued or running. False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    async def close(self) -> None:
        await super().close()
        self._thread.join(timeout=STOP_TIMEOUT_S)
