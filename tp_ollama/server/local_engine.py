"""The Engine protocol over a model in this process (TP=1): loads in a worker thread, generates in a
dedicated thread per request, one request at a time.

The generating thread hands tokens to the event loop through an asyncio queue. Closing the event
stream (aclose, a cancelled task, a client that went away) sets a flag that generate_tokens reads
through its `lockstep` before every decode step, so the thread stops within one step; the request's
slot is released by the thread itself when it ends, so a cancelled consumer never has to await it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tp_ollama.checkpoints.base import Checkpoint
from tp_ollama.checkpoints.loader import load_model, open_checkpoint, parse_dtype
from tp_ollama.engine.constraint import Grammar, GrammarVocabulary, LocalConstraint, vocabulary_for
from tp_ollama.engine.embed import embed_batch
from tp_ollama.engine.generate import GenerationStats, generate_tokens
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.errors import RequestError
from tp_ollama.parallel.facts import rank_facts
from tp_ollama.server.engine_api import LoadedModel, LoadRequest, OutputFormat, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What one request did, kept for observation (tests, logs)."""

    prompt_tokens: int
    eval_count: int = 0
    cancelled: bool = False
    eval_count_at_cancel: int | None = None  # tokens already generated when the cancel arrived
    done_reason: str = ""
    finished: bool = False


class _Run:
    """One request's lockstep: proceed() is False once the consumer has gone."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.stats = GenerationStats()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self.record.cancelled = True
            self.record.eval_count_at_cancel = self.stats.eval_count
            self._cancel.set()

    def proceed(self) -> bool:
        return not self._cancel.is_set()

    def stop(self) -> None:
        self._cancel.set()


class LocalEngine:
    def __init__(self, device: str = "cpu") -> None:
        self._device = torch.device(device)
        self._lock = asyncio.Lock()  # one request (or load) at a time; batching is a later issue
        self._model: nn.Module | None = None
        self._checkpoint: Checkpoint | None = None
        self._loaded: LoadedModel | None = None
        self._vocabulary: GrammarVocabulary | None = None  # built on the first structured request
        self._changed = threading.Condition()  # for observers on other threads (tests)
        self.active = 0  # generating threads alive
        self.runs: list[RunRecord] = []

    # --- Engine protocol ----------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> LoadedModel:
        async with self._lock:
            current = self._loaded
            if current is not None and current.path == request.path and current.dtype == request.dtype:
                # The KV cache is allocated per request here, so a new num_ctx needs no reload.
                self._loaded = replace(current, num_ctx=request.num_ctx)
                return self._loaded
            self._drop()
            checkpoint, model = await asyncio.to_thread(self._read, request)
            size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            self._checkpoint, self._model = checkpoint, model
            self._loaded = LoadedModel(
                path=request.path,
                dtype=request.dtype,
                num_ctx=request.num_ctx,
                world_size=1,
                layout=[{"rank": 0, "device": str(self._device)}],
                size_bytes=size,
            )
            return self._loaded

    async def unload(self) -> None:
        async with self._lock:
            self._drop()

    def loaded(self) -> LoadedModel | None:
        return self._loaded

    async def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None = None,
    ) -> AsyncIterator[TokenEvent]:
        await self._lock.acquire()
        try:
            if self._model is None:
                raise RequestError("no model is loaded")
            constraint = None
            if output_format is not None:
                grammar = await asyncio.to_thread(self._grammar, output_format)
                constraint = LocalConstraint(grammar)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
            run = _Run(RunRecord(prompt_tokens=len(prompt)))
            thread = threading.Thread(
                target=self._work,
                args=(self._model, list(prompt), options, eos_ids, constraint, run, loop, queue),
                name="tp-ollama-generate",
                daemon=True,
            )
            with self._changed:
                self.active += 1
                self.runs.append(run.record)
            thread.start()
        except BaseException:
            self._lock.release()
            raise
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.done
                yield item
        finally:
            if not done:
                # No await here: a cancelled consumer may not be able to; the thread frees the slot.
                run.cancel()

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        async with self._lock:
            if self._model is None:
                raise RequestError("no model is loaded")
            vectors = await asyncio.to_thread(embed_batch, self._model, inputs)
            return vectors.tolist()

    async def cluster(self) -> dict[str, Any]:
        facts = await asyncio.to_thread(rank_facts, 0, self._device)
        return {"world_size": 1, "ranks": [facts], "as_of": time.time()}

    async def close(self) -> None:
        await self.unload()

    # --- observation --------------------------------------------------------------------------

    @property
    def slots_free(self) -> int:
        return 1 - self.active

    def wait_idle(self, timeout: float) -> bool:
        """From another thread: wait until no request is generating. False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.active == 0, timeout)

    # --- internals ----------------------------------------------------------------------------

    def _read(self, request: LoadRequest) -> tuple[Checkpoint, nn.Module]:
        checkpoint = open_checkpoint(request.path)
        try:
            model = load_model(checkpoint, parse_dtype(request.dtype), self._device)
        except BaseException:
            checkpoint.close()
            raise
        log.info("loaded %s as %s on %s", request.path, request.dtype, self._device)
        return checkpoint, model

    def _grammar(self, output_format: OutputFormat) -> Grammar:
        assert self._loaded is not None and self._model is not None
        if self._vocabulary is None:
            vocab_size = int(self._model.config.vocab_size)  # type: ignore[union-attr,arg-type]
            self._vocabulary = vocabulary_for(self._loaded.path, vocab_size)
        return Grammar(self._vocabulary, output_format.kind, output_format.schema)

    def _drop(self) -> None:
        # The model goes before its checkpoint: some tensors may still view the checkpoint's pages.
        self._model = None
        self._vocabulary = None
        self._loaded = None
        if self._checkpoint is not None:
            gc.collect()
            self._checkpoint.close()
            self._checkpoint = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _work(
        self,
        model: nn.Module,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        constraint: LocalConstraint | None,
        run: _Run,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
    ) -> None:
        def put(item: TokenEvent | BaseException) -> None:
            if not run.proceed():
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop has closed (server shutdown)
                run.stop()

        stats = run.stats
        try:
            for token in generate_tokens(model, prompt, options, eos_ids, stats, lockstep=run, constraint=constraint):
                put(TokenEvent(token))
            put(
                TokenEvent(
                    None,
                    done=True,
                    done_reason=stats.done_reason,
                    prompt_eval_count=stats.prompt_eval_count,
                    prompt_eval_duration=stats.prompt_eval_duration,
                    eval_count=stats.eval_count,
                    eval_duration=stats.eval_duration,
                )
            )
        except Exception as e:
            log.warning("generation failed: %s", e)
            put(e)
        finally:
            run.record.eval_count, run.record.done_reason = stats.eval_count, stats.done_reason
            try:
                loop.call_soon_threadsafe(self._finished, run)
            except RuntimeError:
                pass

    def _finished(self, run: _Run) -> None:
        with self._changed:
            run.record.finished = True
            self.active -= 1
            self._changed.notify_all()
        self._lock.release()
