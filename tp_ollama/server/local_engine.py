"""The Engine protocol over a model in this process: the same serving loop as a tensor-parallel
engine group (parallel/engine_server.py), run by a group of one in a thread and reached through a
socket pair, so that batching, cancellation and every command behave exactly as they do with
`serve --tp N`. For in-process tests and small setups."""

from __future__ import annotations

import logging
import socket
import threading
import time

from tp_ollama.parallel.engine_server import (
    DEFAULT_KV_BYTES,
    EngineJob,
    EngineState,
    FrontEndLink,
    RunRecord,
    SoloComm,
    serve_loop,
)
from tp_ollama.server.remote_engine import RemoteEngine

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


class LocalEngine(RemoteEngine):
    def __init__(
        self,
        device: str = "cpu",
        max_running: int = 16,
        kv_cache_bytes: int = DEFAULT_KV_BYTES,
        prefix_cache: bool = True,
    ) -> None:
        front, back = socket.socketpair()
        super().__init__(sock=front)
        job = EngineJob("", device=device, max_running=max_running, kv_cache_bytes=kv_cache_bytes,
                        prefix_cache=prefix_cache)  # fmt: skip
        self.state = EngineState(job, SoloComm())
        self._link = FrontEndLink(conn=back)
        self._thread = threading.Thread(target=self._serve, name="tp-ollama-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            serve_loop(self.state, self._link)
        except Exception:
            log.exception("the in-process engine stopped")
        finally:
            self._link.close()

    # --- observation (tests) ----------------------------------------------------------------------

    @property
    def runs(self) -> list[RunRecord]:
        return list(self.state.records.values())

    def idle(self) -> bool:
        batch, planner = self.state.batch, self.state.planner
        return (batch is None or not batch.running) and (planner is None or not planner.waiting)

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
