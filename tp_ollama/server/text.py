"""The text side of serving, between the wire formats (schemas.py) and the token-level engine:
tokenizers per model, prompts rendered from requests, options layered with limits, the one loaded
model with its admission (how many requests hold it at once, the queue) and keep-alive, and token
events turned into reply pieces: text with stop strings cut out, read as thinking, content and tool
calls (server/reply.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.detokenize import IncrementalDetokenizer
from tp_ollama.engine.options import GenerationOptions, check_prompt
from tp_ollama.engine.stop import StoppedText
from tp_ollama.errors import EngineUnavailable, RequestError, ServerBusy
from tp_ollama.server.chat_schemas import Think
from tp_ollama.server.engine_api import Engine, LoadRequest, OutputFormat
from tp_ollama.server.fields import ApiError
from tp_ollama.server.monitor import Monitor, Track
from tp_ollama.server.replicas import ReplicaSet
from tp_ollama.server.reply import Piece, ReplyDetokenizer, ReplyFormat, ReplyParser
from tp_ollama.server.schemas import ChatRequest, GenerateRequest, Metrics, ModelResolver, ResolvedModel, ps_model
from tp_ollama.server.thinking import THINK_OPEN
from tp_ollama.store.embedded import normalize_name
from tp_ollama.store.names import InvalidModelName, parse_name

log = logging.getLogger(__name__)
T = TypeVar("T")

# Every key Ollama accepts in `options` (Modelfile PARAMETERs too), legacy ones included; others are
# ignored with a warning, as upstream does.
KNOWN_OPTIONS = frozenset(
    "num_ctx num_batch num_gpu main_gpu use_mmap num_thread draft_num_predict num_keep seed num_predict top_k "
    "top_p min_p typical_p repeat_last_n temperature repeat_penalty presence_penalty frequency_penalty stop "
    "mirostat mirostat_tau mirostat_eta tfs_z penalize_newline numa low_vram f16_kv logits_all vocab_only "
    "use_mlock embedding_only".split()
)


@dataclass(frozen=True)
class Limits:
    default_num_ctx: int = 4096
    max_num_ctx: int = 131072
    max_num_predict: int = 32768
    keep_alive_s: float = 300.0  # negative: forever
    dtype: str = "float32"
    quant: str = "none"
    max_concurrent: int = 4  # requests holding the model at once, per engine group (OLLAMA_NUM_PARALLEL)
    max_queue: int = 512  # requests allowed to wait for it; one more is refused (OLLAMA_MAX_QUEUE)
    timeout_s: float = 300.0  # longest wait in the queue and for the model to load; 0: none (inference.timeout)

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queue < 1:
            raise ValueError(
                f"max_concurrent = {self.max_concurrent} and max_queue = {self.max_queue}: expected both >= 1"
            )


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


# --- the loaded model ------------------------------------------------------------------------------


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
                        load = LoadRequest(resolved.path, self._limits.dtype, num_ctx, self._limits.quant)
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


# --- requests -> prompts ---------------------------------------------------------------------------


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
        return resolved.name or normalize_name(request_name)

    async def tokenizer(self, path: Path) -> Tokenizer:
        async with self._tokenizer_lock:
            if path not in self._tokenizers:
                self._tokenizers[path] = await asyncio.to_thread(Tokenizer.for_model, path)
            return self._tokenizers[path]

    def options(self, params: Mapping[str, Any], request: Mapping[str, Any]) -> GenerationOptions:
        """Server defaults, then the model's PARAMETERs, then the request's options; then the limits."""
        unknown = sorted(set(request) - KNOWN_OPTIONS)
        if unknown:
            log.warning("ignoring unknown options: %s", ", ".join(unknown))
        merged = {"num_ctx": self.limits.default_num_ctx, **params, **request}
        options = GenerationOptions.from_ollama(merged)
        num_predict = options.num_predict
        if num_predict < 0 or num_predict > self.limits.max_num_predict:
            num_predict = self.limits.max_num_predict
        return replace(options, num_ctx=min(options.num_ctx, self.limits.max_num_ctx), num_predict=num_predict)

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
        reply, variables = self._reply_format(tokenizer, req.model, resolved, req.think, ())
        if req.raw or tokenizer.chat_template is None:
            ids = tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            system = req.system if req.system is not None else resolved.system
            messages: list[Mapping[str, Any]] = [{"role": "system", "content": system}] if system else []
            if req.context is None:
                messages += resolved.messages
            messages.append({"role": "user", "content": req.prompt})
            ids, reply = _render(tokenizer, messages, reply, variables)
        if req.context:
            bad = [t for t in req.context if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise RequestError(
                    f"context holds token ids outside the vocabulary (0..{tokenizer.vocab_size - 1}): {bad[:5]}"
                )
            if ids[:1] == [tokenizer.bos_id]:
                ids = ids[1:]  # the context already starts with BOS
            ids = list(req.context) + ids
        job = self._job(req.model, resolved, tokenizer, ids, options, req.keep_alive, started_ns)
        return replace(job, output_format=req.format, reply=reply)

    async def chat_job(self, req: ChatRequest, resolved: ResolvedModel, started_ns: int) -> Job:
        tokenizer = await self.tokenizer(resolved.path)
        options = self.options(resolved.params, req.options)
        messages: list[Mapping[str, Any]] = [*resolved.messages, *(m.for_template() for m in req.messages)]
        if resolved.system and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": resolved.system})
        reply, variables = self._reply_format(tokenizer, req.model, resolved, req.think, req.tools)
        ids, reply = _render(tokenizer, messages, reply, variables, req.tools)
        job = self._job(req.model, resolved, tokenizer, ids, options, req.keep_alive, started_ns)
        return replace(job, output_format=req.format, reply=reply)

    def _reply_format(
        self,
        tokenizer: Tokenizer,
        model: str,
        resolved: ResolvedModel,
        think: Think,
        tools: Sequence[Mapping[str, Any]],
    ) -> tuple[ReplyFormat, dict[str, Any]]:
        """How to read the reply, and the template variables that ask for it. Tools, or thinking asked
        for, on a model whose chat template cannot render them are refused with upstream's words.
        A thinking model thinks unless `think` is false (upstream's default)."""
        features = tokenizer.chat_features()
        if tools and not features.tools:
            raise ApiError(400, f"{self._full_name(model, resolved)} does not support tools")
        if think not in (None, False) and not features.thinking:
            raise ApiError(400, f'"{model}" does not support thinking')
        thinking = features.thinking and think is not False
        variables = {"enable_thinking": thinking} if features.thinking else {}
        names = frozenset(t["function"]["name"] for t in tools) if tools else None
        return ReplyFormat(thinking=thinking, tools=names), variables

    def _full_name(self, model: str, resolved: ResolvedModel) -> str:
        """`registry.ollama.ai/library/smollm2:135m`: how upstream names a model in capability errors."""
        name = self.display_name(model, resolved)
        try:
            return parse_name(name).full
        except InvalidModelName:
            return name

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
        """Token events to text cut at stop strings (StoppedText, as every text stream), then read as
        thinking, content and tool calls (job.reply)."""
        markers = job.reply.markers()
        detok = ReplyDetokenizer(job.tokenizer, markers) if markers else IncrementalDetokenizer(job.tokenizer)
        reply = ReplyParser(job.reply)
        cut = StoppedText(detok, job.options.stop)
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
                    text, stopped = cut.push(event.token)
                    piece = reply.push(text) if text else None
                    if piece:
                        yield piece
                    if stopped:
                        # Measured here: the engine is stopped early and sends no final event.
                        now = time.perf_counter_ns()
                        metrics = Metrics("stop", 0, 0, len(job.prompt), first - start, len(tokens), now - first)
                        self.monitor.finished(track, eval_count=len(tokens), eval_duration=now - first)
                        if piece := reply.flush():
                            yield piece
                        yield Outcome(metrics, job.prompt + tokens)
                        return
                if event.done:
                    tail, stopped = cut.finish()
                    piece = Piece.join([reply.push(tail), reply.flush()])
                    if piece:
                        yield piece
                    reason = "stop" if stopped else event.done_reason
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


def _render(
    tokenizer: Tokenizer,
    messages: list[Mapping[str, Any]],
    reply: ReplyFormat,
    variables: Mapping[str, Any],
    tools: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[int], ReplyFormat]:
    """Prompt ids, and the reply format told whether the prompt opens the reasoning itself."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None, **variables)
    if reply.thinking and text.rstrip().endswith(THINK_OPEN):
        reply = replace(reply, thinking_open=True)
    # The template writes BOS itself where the model wants it, as transformers assumes.
    return tokenizer.encode(text, add_special_tokens=False), reply
