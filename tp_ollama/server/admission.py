"""Admission to the loaded model: how many requests hold it at once (`Limits`, `Scheduler`), the
FIFO queue of those waiting for it, each request's hold (`Lease`) and its time limit (`Deadline`),
model loads and switches, and keep-alive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tp_ollama.errors import EngineUnavailable, ServerBusy
from tp_ollama.server.engine_api import Engine, LoadRequest
from tp_ollama.server.schemas import ResolvedModel, ps_model

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The server's limits: caps on every request's options (server/prompts.py), keep-alive, how the
    model loads, and admission."""

    default_num_ctx: int = 4096
    max_num_ctx: int = 131072
    max_num_predict: int = 32768
    keep_alive_s: float = 300.0  # negative: forever
    dtype: str = "auto"
    quant: str = "auto"
    max_concurrent: int = 4  # requests holding the model at once, per engine group (OLLAMA_NUM_PARALLEL)
    max_queue: int = 512  # requests allowed to wait for it; one more is refused (OLLAMA_MAX_QUEUE)
    timeout_s: float = 300.0  # longest wait in the queue and for the model to load; 0: none (inference.timeout)

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queue < 1:
            raise ValueError(
                f"max_concurrent = {self.max_concurrent} and max_queue = {self.max_queue}: expected both >= 1"
            )


class Lease:
    """A request's hold on the loaded model; `release()` is idempotent and never blocks. It returns
    the unload task when the request's keep_alive is 0, for callers that can wait for it."""

    def __init__(self, scheduler: Scheduler, keep_alive: float | None, load_ns: int) -> None:
        self._scheduler = scheduler
        self.keep_alive = keep_alive
        self.load_ns = load_ns
        self._released = False

    def release(self) -> asyncio.Task[None] | None:
        if self._released:
            return None
        self._released = True
        return self._scheduler._release(self.keep_alive)


class Deadline:
    """inference.timeout for one request's wait (queue, lock, model load): each awaited step gets
    what is left, and running out is a 503 that says so; 0 s: no limit."""

    def __init__(self, seconds: float, name: str) -> None:
        self.seconds, self.name = seconds, name
        self.at = time.monotonic() + seconds if seconds > 0 else None

    async def bound(self, step: Awaitable[T]) -> T:
        if self.at is None:
            return await step
        try:
            # wait_for runs the step as its own task: on time-out only that step is cancelled.
            return await asyncio.wait_for(step, max(0.0, self.at - time.monotonic()))
        except TimeoutError:
            raise EngineUnavailable(
                f"timed out after {self.seconds:g} s waiting for model '{self.name}' to be free and loaded "
                "(inference.timeout)"
            ) from None


class Scheduler:
    """Admission to the engine, the only place requests wait for the model. One model is loaded at a
    time; up to `limits.max_concurrent` requests per engine group hold it at once (`groups`: the
    replicas behind `engine`, so R replicas admit R x max_concurrent). Others wait in one FIFO queue
    of at most `limits.max_queue`; one more is refused at once with ServerBusy (HTTP 503).

    The head of the queue is admitted when its model is loaded and a slot is free. A request for
    another model (or num_ctx) waits at the head until the current model's requests have all
    finished, then loads it; requests behind it wait too, so none can starve it. A waiter that is
    cancelled (its client went away) leaves the queue. An idle model unloads when its keep-alive
    runs out."""

    def __init__(self, engine: Engine, limits: Limits, groups: int = 1) -> None:
        self._engine = engine
        self._limits = limits
        self._capacity = limits.max_concurrent * groups
        # Held by the head of the queue while it waits for a slot or loads, and by unloads and model
        # switches; asyncio.Lock wakes its waiters in arrival order, which makes the queue FIFO.
        self._lock = asyncio.Lock()
        self._freed = asyncio.Event()  # a lease ended: the head looks again
        self._active = 0
        self._waiting = 0
        self._epoch = 0  # bumps on every acquire, so a stale timer never unloads
        self._name = ""
        self._resolved: ResolvedModel | None = None
        self._keep_alive = limits.keep_alive_s
        self._unload_when_idle = False
        self._expires: float | None = None
        self._timer: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        """Requests that may hold the model at once."""
        return self._capacity

    @property
    def active(self) -> int:
        """Requests holding the model now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests in the queue now (the length that max_queue bounds)."""
        return self._waiting

    async def acquire(self, name: str, resolved: ResolvedModel, num_ctx: int, keep_alive: float | None) -> Lease:
        if self._waiting >= self._limits.max_queue:
            raise ServerBusy()
        t0 = time.perf_counter_ns()
        deadline = Deadline(self._limits.timeout_s, name)
        self._waiting += 1
        try:
            await deadline.bound(self._lock.acquire())
            try:
                while not (self._holds(resolved.path, num_ctx) and self._active < self._capacity):
                    if self._active == 0:
                        self._cancel_timer()
                        limits = self._limits
                        load = LoadRequest(resolved.path, limits.dtype, num_ctx, limits.quant, tuple(resolved.files))
                        await deadline.bound(self._engine.load(load))
                        break
                    self._freed.clear()
                    await deadline.bound(self._freed.wait())
                # No await from here to the return: a cancellation cannot lose a slot once taken.
                self._epoch += 1
                self._cancel_timer()
                self._active += 1
                self._name, self._resolved = name, resolved
            finally:
                self._lock.release()
        finally:
            self._waiting -= 1
        return Lease(self, keep_alive, time.perf_counter_ns() - t0)

    async def unload(self, resolved: ResolvedModel) -> None:
        """Unload now if `resolved` is loaded and idle, else as soon as its requests finish."""
        async with self._lock:
            loaded = self._engine.loaded()
            if loaded is not None and loaded.path == resolved.path:
                await self._unload_locked()

    async def forget(self, name: str) -> None:
        """The model name `name` (display form) was deleted or now means another model: unload it
        if it is what is loaded under that name, so that /api/ps never shows a model that is gone.
        Another name for the same weights keeps them loaded."""
        async with self._lock:
            if self._engine.loaded() is not None and self._name.casefold() == name.casefold():
                await self._unload_locked()

    async def _unload_locked(self) -> None:
        if self._active > 0:
            self._unload_when_idle = True
            return
        self._epoch += 1
        self._cancel_timer()
        await self._engine.unload()

    def running(self) -> list[dict[str, Any]]:
        """/api/ps entries."""
        loaded = self._engine.loaded()
        if loaded is None:
            return []
        resolved = self._resolved if self._resolved is not None and self._resolved.path == loaded.path else None
        if self._active > 0:
            expires = None if self._keep_alive < 0 else time.time() + self._keep_alive
        else:
            expires = self._expires
        on_gpu = any(str(rank.get("device", "")).startswith("cuda") for rank in loaded.layout)
        details = {"format": "safetensors" if loaded.path.is_dir() else "gguf"}
        return [
            ps_model(
                name=self._name or loaded.path.name,
                size=loaded.size_bytes,
                size_vram=loaded.size_bytes if on_gpu else 0,
                digest=resolved.digest if resolved else "",
                details={**details, **{k: v for k, v in (resolved.details.to_dict() if resolved else {}).items() if v}},
                expires=expires,
                num_ctx=loaded.num_ctx,
                precision=loaded.precision,
            )
        ]

    def close(self) -> None:
        self._cancel_timer()

    def _holds(self, path: Path, num_ctx: int) -> bool:
        loaded = self._engine.loaded()
        return loaded is not None and loaded.path == path and loaded.num_ctx == num_ctx

    def _release(self, keep_alive: float | None) -> asyncio.Task[None] | None:
        # The latest request sets the model's keep-alive; the timer starts when the last one ends.
        self._keep_alive = self._limits.keep_alive_s if keep_alive is None else keep_alive
        self._active -= 1
        self._freed.set()
        if self._active > 0:
            return None
        seconds = 0.0 if self._unload_when_idle else self._keep_alive
        self._unload_when_idle = False
        if seconds < 0:
            self._expires = None
            return None
        self._expires = time.time() + seconds
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().create_task(self._expire(seconds, self._epoch))
        return self._timer if seconds == 0 else None

    async def _expire(self, seconds: float, epoch: int) -> None:
        await asyncio.sleep(seconds)
        async with self._lock:
            if self._active == 0 and self._epoch == epoch and self._engine.loaded() is not None:
                log.info("keep-alive of %s ran out: unloading", self._name)
                await self._engine.unload()

    def _cancel_timer(self) -> None:
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
        self._timer = None
