"""The serving loop driven by its caller, one request at a time: one-shot `generate` (at any TP degree),
the in-process reference of the tests and the benchmarks' decode runs. The same `EngineLoop.step`
as `serve`, with the batch holding one sequence, so there is one place where a step happens.

Every rank of a group calls the same methods in the same order with the same arguments: rank 0
decides each step and the others follow its ticks; every rank yields the same tokens.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tp_ollama.engine.batch import positions_needed
from tp_ollama.engine.link import LocalLink
from tp_ollama.engine.loop import EngineLoop
from tp_ollama.engine.options import GenerationOptions, check_prompt
from tp_ollama.engine.protocol import (
    Cancel,
    Failed,
    FinalStats,
    Generate,
    Load,
    Loaded,
    LoadInfo,
    OutputFormat,
    Reply,
    Shutdown,
)
from tp_ollama.engine.state import EngineJob, EngineState
from tp_ollama.errors import TpOllamaError
from tp_ollama.parallel.comm import Comm, SoloComm
from tp_ollama.parallel.layout import TPLayout


@dataclass
class GenerationStats:
    """How one request went: its tokens, and Ollama's counts and nanosecond durations."""

    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    done_reason: str = ""  # "stop" (an end token, or the caller stopped it: a stop string) or "length"
    tokens: list[int] = field(default_factory=list)

    def take(self, final: FinalStats) -> None:
        self.prompt_eval_count, self.prompt_eval_duration = final.prompt_eval_count, final.prompt_eval_duration
        self.eval_count, self.eval_duration = final.eval_count, final.eval_duration
        self.done_reason = "stop" if final.done_reason == "cancel" else final.done_reason


class DirectEngine:
    """An engine group's loop, stepped by the caller. Load a model with `load`, then `generate`."""

    def __init__(self, job: EngineJob | None = None, comm: Comm | None = None) -> None:
        comm = comm if comm is not None else SoloComm()
        self.state = EngineState(job if job is not None else EngineJob(kv_cache_bytes=None), comm)
        self.link = LocalLink() if comm.rank == 0 else None
        self.loop = EngineLoop(self.state, self.link)
        self._ids = (f"d{i}" for i in itertools.count())

    @property
    def rank(self) -> int:
        return self.state.comm.rank

    def load(self, path: str, dtype: str = "auto", num_ctx: int = 4096, quant: str = "auto") -> LoadInfo:
        """Load this rank's shard (every rank, together)."""
        cmd = Load(next(self._ids), path, dtype, num_ctx, quant)
        with torch.inference_mode():
            self._submit(cmd)
            self.loop.step()
        replies = self._drain()
        if self.rank != 0:
            if self.state.loaded is None:
                raise TpOllamaError(f"rank {self.rank}: the model did not load (rank 0 reports why)")
            return self.state.loaded
        for reply in replies:
            if isinstance(reply, Failed):
                raise TpOllamaError(reply.error)
            if isinstance(reply, Loaded):
                return reply.info
        raise AssertionError(f"the load of {path} got no reply")

    def attach(self, model: nn.Module, layout: TPLayout | None = None, path: str = "", num_ctx: int = 4096) -> None:
        """Serve a model already built in this process (this rank's shard, with its `layout` when the
        group has several ranks). `path` is where its tokenizer is, for structured output."""
        if layout is None:
            layout = TPLayout.build(model.config, self.state.comm.world_size, None)
        self.state.attach(model, layout, Load(next(self._ids), path, num_ctx=num_ctx))

    def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos: Iterable[int] = (),
        output_format: OutputFormat | None = None,
        stats: GenerationStats | None = None,
    ) -> Generator[int, None, None]:
        """Yield the generated token ids until an end token (not yielded), num_predict or num_ctx.
        The caller may stop iterating at any time (a stop string): the request is cancelled on every
        rank, and `stats` gets its counts."""
        stats = stats if stats is not None else GenerationStats()
        check_prompt(len(prompt), options)  # on every rank alike, before anything is sent
        self.state.fit_kv(positions_needed(len(prompt), options))
        rid = next(self._ids)
        self._submit(Generate(rid, list(prompt), options, frozenset(eos), output_format))
        over = False
        try:
            while not over:
                with torch.inference_mode():
                    stepped = self.loop.step()
                new = []
                for event in stepped.events:
                    if event.id == rid and event.token is not None:
                        new.append(event.token)
                    if event.id == rid and event.stats is not None:
                        over = True
                        stats.take(event.stats)
                over = over or rid in stepped.tick.ended
                self._check_replies(rid)
                stats.tokens += new
                yield from new
        finally:
            if not over:
                # The caller left early: the drop travels in the next tick, so every rank frees it.
                self._submit(Cancel(rid))
                with torch.inference_mode():
                    stepped = self.loop.step()
                for event in stepped.events:
                    if event.id == rid and event.stats is not None:
                        stats.take(event.stats)
                self._check_replies(rid)

    def generate_all(
        self,
        prompts: list[list[int]],
        options: list[GenerationOptions],
        cancel_after: dict[int, int] | None = None,
        stats: list[GenerationStats] | None = None,
    ) -> list[list[int]]:
        """Several requests at once, as a server's batch runs them: all submitted together, stepped
        until each ends; each one's tokens. `cancel_after` {i: n}: request i is cancelled once it has
        n tokens (rank 0 decides; the others follow its ticks)."""
        if len(options) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(options)} options: expected one each")
        for prompt, opts in zip(prompts, options, strict=True):
            check_prompt(len(prompt), opts)
        self.state.fit_kv(*(positions_needed(len(p), o) for p, o in zip(prompts, options, strict=True)))
        rids = [next(self._ids) for _ in prompts]
        for rid, prompt, opts in zip(rids, prompts, options, strict=True):
            self._submit(Generate(rid, list(prompt), opts, frozenset()))
        index = {rid: i for i, rid in enumerate(rids)}
        tokens: list[list[int]] = [[] for _ in prompts]
        cancel = dict(cancel_after or {})
        left = set(rids)
        while left:
            with torch.inference_mode():
                stepped = self.loop.step()
            for event in stepped.events:
                i = index[event.id]
                if event.token is not None:
                    tokens[i].append(event.token)
                if event.stats is not None:
                    left.discard(event.id)
                    if stats is not None:
                        stats[i].take(event.stats)
                        stats[i].tokens = tokens[i]
                if cancel.get(i) == len(tokens[i]) and event.id in left:
                    del cancel[i]
                    self._submit(Cancel(event.id))
            left -= set(stepped.tick.ended)
            for reply in self._drain():
                if isinstance(reply, Failed):
                    raise TpOllamaError(reply.error)
        return tokens

    def close(self) -> None:
        """End the loop on every rank (rank 0 tells the others; they return from `follow` or a step)."""
        self._submit(Shutdown())
        self.loop.step()

    def follow(self) -> None:
        """Ranks other than 0: step with rank 0 until it closes (rank 0 drives through `generate`)."""
        self.loop.run()

    def _submit(self, cmd: Generate | Cancel | Load | Shutdown) -> None:
        if self.link is not None:
            self.link.inbox.append(cmd)

    def _drain(self) -> list[Reply]:
        """Rank 0: the replies the loop sent since the last look (none on the other ranks)."""
        if self.link is None:
            return []
        replies, self.link.outbox = list(self.link.outbox), deque()
        return replies

    def _check_replies(self, rid: str) -> None:
        """The tokens went to the caller from the batch's events; a refusal of `rid` is raised here."""
        for reply in self._drain():
            if isinstance(reply, Failed) and reply.id == rid:
                raise TpOllamaError(reply.error)


def generate_ids(
    model: nn.Module,
    prompt: list[int],
    options: GenerationOptions,
    eos: Iterable[int] = (),
    *,
    comm: Comm | None = None,
    layout: TPLayout | None = None,
    path: str = "",
    output_format: OutputFormat | None = None,
    stats: GenerationStats | None = None,
) -> Generator[int, None, None]:
    """The tokens of one request on a model already built here, through a fresh engine loop (every
    rank of `comm` calls it alike)."""
    engine = DirectEngine(EngineJob(kv_cache_bytes=None), comm)
    engine.attach(model, layout, path, options.num_ctx)
    return engine.generate(prompt, options, eos, output_format, stats)
