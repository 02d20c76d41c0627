"""The text side of serving, between the route handlers and the engine: a request resolved to its
model and tokenizer, built into a Job (options and prompt: server/prompts.py), admitted to the loaded
model (server/admission.py), and its token events streamed back through the text pipeline
(text/pipeline.py) as reply pieces: text cut at stop strings, read as thinking, content and tool calls."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.options import GenerationOptions, check_prompt
from tp_ollama.engine.protocol import OutputFormat
from tp_ollama.server.admission import Lease, Limits, Scheduler
from tp_ollama.server.engine_api import Engine
from tp_ollama.server.monitor import Monitor, Track
from tp_ollama.server.prompts import chat_prompt, display_name, generate_prompt, merge_options
from tp_ollama.server.replicas import ReplicaSet
from tp_ollama.server.schemas import ChatRequest, GenerateRequest, Metrics, ModelResolver, ResolvedModel
from tp_ollama.text.pipeline import TextPipeline
from tp_ollama.text.reply import Piece, ReplyFormat, ReplyParser


@dataclass(frozen=True)
class Job:
    """One generation request, ready for the engine."""

    model: str  # the request's spelling, echoed in responses
    name: str  # display name for /api/ps
    resolved: ResolvedModel
    tokenizer: Tokenizer
    prompt: list[int]
    options: GenerationOptions
    keep_alive: float | None
    started_ns: int
    output_format: OutputFormat | None = None  # structured output, enforced by the engine
    reply: ReplyFormat = field(default_factory=ReplyFormat)  # thinking and tool calls to read out of the text


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: the final chunk's metrics, and prompt + generated ids (`context`)."""

    metrics: Metrics
    context: list[int]


class TextService:
    """What the route handlers call: resolve, build a Job, hold the model, stream text."""

    def __init__(self, engine: Engine, models: ModelResolver, limits: Limits, monitor: Monitor | None = None) -> None:
        # One engine group is a set of one replica: routing, per-replica counters and the cluster
        # endpoints work the same for one group or several.
        self.engine = engine if isinstance(engine, ReplicaSet) else ReplicaSet([engine])
        self.models = models
        self.limits = limits
        self.scheduler = Scheduler(self.engine, limits, groups=len(self.engine))
        self.monitor = monitor if monitor is not None else Monitor()
        self._tracks: weakref.WeakKeyDictionary[Lease, Track] = weakref.WeakKeyDictionary()
        self._tokenizers: dict[Path, Tokenizer] = {}
        self._tokenizer_lock = asyncio.Lock()

    async def resolve(self, name: str) -> ResolvedModel:
        # A store may read files (or assemble an embedded model): off the event loop.
        return await asyncio.to_thread(self.models.resolve, name)

    def display_name(self, request_name: str, resolved: ResolvedModel) -> str:
        return display_name(request_name, resolved)

    async def tokenizer(self, path: Path) -> Tokenizer:
        async with self._tokenizer_lock:
            if path not in self._tokenizers:
                self._tokenizers[path] = await asyncio.to_thread(Tokenizer.for_model, path)
            return self._tokenizers[path]

    def options(self, params: Mapping[str, Any], request: Mapping[str, Any]) -> GenerationOptions:
        """Server defaults, then the model's PARAMETERs, then the request's options; then the limits."""
        return merge_options(self.limits, params, request)

    async def load_only(
        self, request_name: str, resolved: ResolvedModel, options: Mapping[str, Any], keep_alive: float | None
    ) -> str:
        """An empty prompt: load (done_reason "load") or, with keep_alive 0, unload ("unload")."""
        if keep_alive == 0:
            await self.scheduler.unload(resolved)
            return "unload"
        num_ctx = self.options(resolved.params, options).num_ctx
        lease = await self.scheduler.acquire(self.display_name(request_name, resolved), resolved, num_ctx, keep_alive)
        lease.release()
        return "load"

    async def generate_job(self, req: GenerateRequest, resolved: ResolvedModel, started_ns: int) -> Job:
        tokenizer = await self.tokenizer(resolved.path)
        options = self.options(resolved.params, req.options)
        ids, reply = generate_prompt(tokenizer, req, resolved)
        job = self._job(req.model, resolved, tokenizer, ids, options, req.keep_alive, started_ns)
        return replace(job, output_format=req.format, reply=reply)

    async def chat_job(self, req: ChatRequest, resolved: ResolvedModel, started_ns: int) -> Job:
        tokenizer = await self.tokenizer(resolved.path)
        options = self.options(resolved.params, req.options)
        ids, reply = chat_prompt(tokenizer, req, resolved)
        job = self._job(req.model, resolved, tokenizer, ids, options, req.keep_alive, started_ns)
        return replace(job, output_format=req.format, reply=reply)

    def _job(
        self,
        model: str,
        resolved: ResolvedModel,
        tokenizer: Tokenizer,
        ids: list[int],
        options: GenerationOptions,
        keep_alive: float | None,
        started_ns: int,
    ) -> Job:
        check_prompt(len(ids), options)
        name = self.display_name(model, resolved)
        return Job(model, name, resolved, tokenizer, ids, options, keep_alive, started_ns)

    # --- running ---------------------------------------------------------------------------------

    async def start(self, job: Job) -> Lease:
        track = self.monitor.queued(job.name, len(job.prompt), job.options.num_predict, job.started_ns)
        try:
            lease = await self.scheduler.acquire(job.name, job.resolved, job.options.num_ctx, job.keep_alive)
        except Exception:
            self.monitor.failed(track)
            raise
        except BaseException:
            self.monitor.cancelled(track)
            raise
        self.monitor.running(track)
        self._tracks[lease] = track
        # A lease whose stream never ran (the client left before the first byte) still ends its
        # request: when the lease goes, so does the request (a no-op once stream() has ended it).
        weakref.finalize(lease, self.monitor.cancelled, track).atexit = False
        return lease

    async def stream(self, job: Job, lease: Lease) -> AsyncIterator[Piece | Outcome]:
        """Pieces of the reply, then one Outcome. The lease is released before the Outcome is handed on, so
        that a keep_alive 0 unload has happened by the time a client reads the final chunk."""
        track = self._tracks.pop(lease, None)
        if track is None:  # a lease taken without start()
            track = self.monitor.queued(job.name, len(job.prompt), job.options.num_predict, job.started_ns)
            self.monitor.running(track)
        try:
            async for item in self._pieces(job, track):
                if isinstance(item, Outcome):
                    unload = lease.release()
                    if unload is not None:
                        await asyncio.wait([unload])
                    m = item.metrics
                    total = time.perf_counter_ns() - job.started_ns
                    item = Outcome(replace(m, total_duration=total, load_duration=lease.load_ns), item.context)
                yield item
        except Exception:
            self.monitor.failed(track)
            raise
        finally:
            # Only a stream closed early (client gone, cancelled) gets here with its request not ended.
            self.monitor.cancelled(track)
            lease.release()

    async def _pieces(self, job: Job, track: Track) -> AsyncIterator[Piece | Outcome]:
        """Token events through the text pipeline: text cut at stop strings, read as thinking, content
        and tool calls (job.reply)."""
        text = TextPipeline(job.tokenizer, job.options.stop, ReplyParser(job.reply))
        tokens: list[int] = []
        start = time.perf_counter_ns()
        first = start
        events = self.engine.generate(job.prompt, job.options, job.tokenizer.eos_ids, job.output_format)
        try:
            async for event in events:
                if event.token is not None:
                    if not tokens:
                        first = time.perf_counter_ns()
                    tokens.append(event.token)
                    self.monitor.token(track)
                    pieces = text.push(event.token)
                    if text.stopped:
                        # Measured here: the engine is stopped early and sends no final event.
                        now = time.perf_counter_ns()
                        metrics = Metrics("stop", 0, 0, len(job.prompt), first - start, len(tokens), now - first)
                        self.monitor.finished(track, eval_count=len(tokens), eval_duration=now - first)
                        for piece in pieces:
                            yield piece
                        yield Outcome(metrics, job.prompt + tokens)
                        return
                    for piece in pieces:
                        yield piece
                if event.done:
                    for piece in text.finish():
                        yield piece
                    reason = "stop" if text.stopped else event.done_reason
                    metrics = Metrics(
                        reason,
                        0,
                        0,
                        event.prompt_eval_count,
                        event.prompt_eval_duration,
                        event.eval_count,
                        event.eval_duration,
                    )
                    self.monitor.finished(
                        track,
                        eval_count=event.eval_count,
                        eval_duration=event.eval_duration,
                        comm_duration=event.comm_duration,
                    )
                    yield Outcome(metrics, job.prompt + tokens)
                    return
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
