"""Continuous batching: many sequences share each forward pass, joining and leaving at every step.

Every rank of a tensor-parallel group holds the same `Batch` and applies the same `Plan` to it, so
their states never diverge: rank 0 decides each step (which requests join, which leave, which prompt
chunk is prefilled) and broadcasts the plan; every rank then runs the step and samples the same
tokens (the samplers exchange per-rank candidates, see engine/sharded_sampling.py).

One step prefills prompt chunks of PREFILL_CHUNK tokens in all (one forward pass per prompt, oldest
request first, so a long prompt delays the running sequences by one chunk at most), then runs one
token for every sequence that is decoding, in one forward pass. Decoding
sequences go through the model as a batch of B rows of one token: the weights are read once for all
of them, which is what makes a batch cheaper per token than B separate requests. Each row attends
over its own keys and values, gathered from the shared paged pool (engine/paged_kv.py); rows of
different lengths are padded with empty positions that the attention mask hides.

With pipeline stages (parallel/pipeline.py) steps flow instead (engine/flow.py): the decoding
sequences form a group per stage, each tick moves every group and every prompt chunk one stage on,
and the planner lets an even share of the ready sequences enter stage 0 each tick.

Tokens are chosen per sequence with its own options, seed and history, and, for structured output,
its own grammar mask (engine/constraint.py). A sequence's KV blocks go back to the pool the step it
ends; full blocks stay cached for the next request that starts with the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tp_ollama.engine.constraint import Constraint
from tp_ollama.engine.flow import Chunk, Flow
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.paged_kv import BlockPool, SequenceKV
from tp_ollama.engine.protocol import FinalStats, Plan, Request
from tp_ollama.kernels.quant import ROW_INVARIANT_ROWS, prefill_numerics
from tp_ollama.models.native_decode import native_decoder
from tp_ollama.parallel.pipeline import stage_of

PREFILL_CHUNK = 256  # prompt tokens per step: bounds how long one prompt stalls the decoding rows


@dataclass
class Running:
    request: Request
    kv: SequenceKV
    sampler: Callable[[torch.Tensor, Sequence[int]], int]
    constraint: Constraint | None
    history: list[int]
    written: int  # positions whose keys and values are in the pool
    entered: int  # prompt positions handed to the model (past `written` while chunks flow through stages)
    limit: int  # tokens it may still generate: num_predict and num_ctx
    cached: int = 0  # prompt tokens taken from the prefix cache
    generated: int = 0
    pending: int | None = None  # the last sampled token, whose KV the next decode step writes
    prompt_ns: int = 0
    first_token_ns: int = 0
    done_reason: str = ""
    comm_s: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.written < len(self.request.prompt)


@dataclass
class Event:
    """What a step produced for one sequence: a token, and/or its end."""

    id: str
    token: int | None = None
    stats: FinalStats | None = None  # set on the sequence's last event

    @property
    def done(self) -> bool:
        return self.stats is not None


class PagedBatchCache:
    """The KV cache of a batch of sequences for one forward pass, as the model's attention sees it:
    `layer(i).update(k, v, positions)` writes the new rows into each sequence's blocks and returns
    every sequence's keys and values, padded to the longest (empty positions are -1, masked).

    Both directions are one indexing op per layer for the whole batch: the new rows are scattered to
    their (block, offset) slots, and each row's blocks are gathered through a (B, blocks) index. A
    sliding-window layer gathers only the blocks its queries can still see."""

    def __init__(
        self,
        pool: BlockPool,
        seqs: list[SequenceKV],
        starts: list[int],
        counts: list[int],
        windows: list[int | None],
    ) -> None:
        self.pool, self.counts, self.windows = pool, counts, windows
        device = pool.k[0].device
        slots = [s.slots(start, n) for s, start, n in zip(seqs, starts, counts, strict=True)]
        self.write_blocks = torch.cat([b for b, _ in slots]).to(device)
        self.write_offsets = torch.cat([o for _, o in slots]).to(device)
        self._reads: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seqs, self._starts = seqs, starts
        self._lengths = [start + n for start, n in zip(starts, counts, strict=True)]

    def reads(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, blocks) block ids to gather and (B, blocks * block_size) their positions (-1: padding)."""
        if window not in self._reads:
            bs = self.pool.block_size
            device = self.pool.k[0].device
            firsts = [0 if window is None else max(0, start - window + 1) // bs for start in self._starts]
            lasts = [(length + bs - 1) // bs for length in self._lengths]
            widest = max(last - first for first, last in zip(firsts, lasts, strict=True))
            index = torch.zeros(len(self._seqs), widest, dtype=torch.long)
            positions = torch.full((len(self._seqs), widest * bs), -1, dtype=torch.long)
            for row, (seq, first, last) in enumerate(zip(self._seqs, firsts, lasts, strict=True)):
                index[row, : last - first] = torch.tensor(seq.table[first:last], dtype=torch.long)
                span = torch.arange(first * bs, min(last * bs, self._lengths[row]))
                positions[row, : span.numel()] = span
            self._reads[window] = (index.to(device), positions.to(device))
        return self._reads[window]

    def layer(self, index: int) -> _PagedLayer:
        return _PagedLayer(self, index)


class _PagedLayer:
    def __init__(self, cache: PagedBatchCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v: (B, n_kv, T, D) new rows; row r's first counts[r] are real, the rest padding."""
        c = self.cache
        pool_k, pool_v = c.pool.k[self.index], c.pool.v[self.index]
        if all(n == k.shape[2] for n in c.counts):
            new_k = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])  # (B*T, n_kv, D)
            new_v = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])
        else:
            new_k = torch.cat([k[r, :, :n].transpose(0, 1) for r, n in enumerate(c.counts)])
            new_v = torch.cat([v[r, :, :n].transpose(0, 1) for r, n in enumerate(c.counts)])
        pool_k[c.write_blocks, :, c.write_offsets] = new_k.to(pool_k.dtype)
        pool_v[c.write_blocks, :, c.write_offsets] = new_v.to(pool_v.dtype)
        blocks, seen = c.reads(c.windows[self.index])
        b, nb = blocks.shape
        _, n_kv, bs, d = pool_k.shape
        keys = pool_k[blocks].permute(0, 2, 1, 3, 4).reshape(b, n_kv, nb * bs, d)
        values = pool_v[blocks].permute(0, 2, 1, 3, 4).reshape(b, n_kv, nb * bs, d)
        return keys, values, seen


class Batch:
    """The sequences of one model on one rank, advanced one plan at a time."""

    def __init__(
        self,
        model: nn.Module,
        pool: BlockPool,
        sampler_factory: Callable[..., Callable[[torch.Tensor, Sequence[int]], int]],
        constraint_factory: Callable[[Request], Constraint | None],
        comm: Any = None,
    ) -> None:
        self.model, self.pool = model, pool
        self.sampler_factory, self.constraint_factory = sampler_factory, constraint_factory
        self.comm = comm
        self.running: dict[str, Running] = {}
        self.device: torch.device = next(model.parameters()).device
        self.vocab = int(model.config.vocab_size)  # type: ignore[union-attr,arg-type]
        self.windows: list[int | None] = [block.self_attn.window for block in model.model.layers]  # type: ignore[union-attr]
        stage = stage_of(model)
        self.flow = Flow(self, stage) if stage is not None and stage.layout.stages > 1 else None

    # --- applying a plan (every rank) ------------------------------------------------------------

    def step(self, plan: Plan) -> list[Event]:
        events: list[Event] = []
        for rid in plan.drop:
            seq = self.running.pop(rid, None)
            if seq is not None:
                if self.flow is not None:
                    self.flow.drop(rid)
                seq.kv.free()
                events.append(self._finish(seq, "cancel", time.perf_counter_ns()))
        for request in plan.add:
            self._start(request)
        fresh: list[tuple[Running, torch.Tensor]] = []  # sequences with logits to sample from
        comm_before = self._comm_seconds()
        for rid, n in plan.prefill if self.flow is None else []:
            seq = self.running[rid]
            row = self._prefill(seq, n)
            if row is not None and seq.request.resumed:
                row = self._resume(seq)
            if row is not None:
                fresh.append((seq, row))
        decoding = [self.running[rid] for rid in plan.decode]
        if self.flow is not None:  # pipeline stages: each tick moves every group and chunk one stage on
            events += self._flow(decoding, [(self.running[rid], n) for rid, n in plan.prefill])
        elif decoding:
            logits = self._decode(decoding)
            fresh += list(zip(decoding, logits, strict=True))
        for seq, row in fresh:
            event = self._sample(seq, row)
            events.append(event)
        if fresh:
            share = (self._comm_seconds() - comm_before) / len(fresh)
            for seq, _ in fresh:
                seq.comm_s += share
        for event in events:
            finished = self.running.pop(event.id, None) if event.done else None  # dropped ones are gone
            if finished is not None:
                finished.kv.free()
        return events

    def _start(self, request: Request) -> None:
        kv, cached = self.pool.new_sequence(request.prompt)
        opts = request.options
        limit = generation_limit(len(request.prompt), opts)
        self.running[request.id] = Running(
            request=request,
            kv=kv,
            sampler=self.sampler_factory(opts.sampling, self.vocab),
            constraint=self.constraint_factory(request) if request.constrained else None,
            history=list(request.prompt),
            written=cached,
            entered=cached,
            cached=cached,
            limit=limit,
        )

    def _prefill(self, seq: Running, n: int) -> torch.Tensor | None:
        """Write the next `n` prompt tokens; the last position's logits once the prompt is in."""
        chunk = self._chunk(seq, n)
        hidden = self.chunk_rows(chunk)
        seq.kv.commit(seq.request.prompt[chunk.start : chunk.start + chunk.n])
        seq.written += chunk.n
        row = None if seq.prefilling else self.prompt_logits(chunk, hidden)
        seq.prompt_ns += time.perf_counter_ns() - chunk.t0_ns
        return row

    def _flow(self, decoding: list[Running], prefill: list[tuple[Running, int]]) -> list[Event]:
        """A tick through pipeline stages (engine/flow.py). A resumed request's prompt goes through the
        stages in turn instead, its given tokens replayed as `_resume` does."""
        events, chunks = [], []
        for seq, n in prefill:
            if seq.request.resumed:
                row = self._prefill(seq, n)
                if row is not None:
                    events.append(self._sample(seq, self._resume(seq)))
            else:
                chunks.append(self._chunk(seq, n))
        assert self.flow is not None
        comm_before = self._comm_seconds()
        finished = self.flow.tick(decoding, chunks)
        # The tick's time in collectives, shared by what left the last stage.
        share = (self._comm_seconds() - comm_before) / len(finished) if finished else 0.0
        for done in finished:
            seq, chunk = done.seq, done.chunk
            seq.comm_s += share
            if chunk is not None:
                seq.kv.commit(seq.request.prompt[chunk.start : chunk.start + chunk.n])
                seq.written += chunk.n
                seq.prompt_ns += time.perf_counter_ns() - chunk.t0_ns
            else:
                self._commit([seq], [seq.pending])
            if done.token is not None:
                events.append(self._accept(seq, done.token))
        return events

    def _chunk(self, seq: Running, n: int) -> Chunk:
        """The next `n` prompt tokens of a sequence, its KV room reserved past any chunk of it still in
        flight. At least ROW_INVARIANT_ROWS rows, padded with positions after the chunk (causal
        attention keeps them out of the real rows; their keys and values land in slots the sequence
        writes again when it gets there): each row then computes as it would in any longer prefill."""
        prompt = seq.request.prompt
        start = seq.entered
        n = min(n, len(prompt) - start)
        ahead = start - seq.written  # chunks of it still in flight
        if not seq.kv.reserve(ahead + n):
            raise RuntimeError(f"the KV pool could not hold {n} more tokens of request {seq.request.id}")
        rows = max(n, min(ROW_INVARIANT_ROWS, positions_needed(len(prompt), seq.request.options) - start))
        if rows > n and not seq.kv.reserve(ahead + rows):
            rows = n
        seq.entered += n
        return Chunk(seq, start, n, rows, time.perf_counter_ns())

    def chunk_rows(self, chunk: Chunk) -> torch.Tensor:
        """A prompt chunk through the model (through this rank's stage alone, in a flow): (1, rows, H)."""
        tokens = chunk.seq.request.prompt[chunk.start : chunk.start + chunk.n]
        tokens = tokens + tokens[-1:] * (chunk.rows - chunk.n)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(chunk.start, chunk.start + chunk.rows, dtype=torch.long, device=self.device)[None]
        cache = PagedBatchCache(self.pool, [chunk.seq.kv], [chunk.start], [chunk.rows], self.windows)
        with prefill_numerics():
            hidden: torch.Tensor = self.model.hidden_states(ids, positions, cache)  # type: ignore[operator]
        return hidden

    def prompt_logits(self, chunk: Chunk, hidden: torch.Tensor) -> torch.Tensor:
        """The logits (vocab slice,) float32 after a prompt's last chunk, from its `chunk_rows`."""
        with prefill_numerics():
            row: torch.Tensor = self.model.logits(hidden[:, chunk.n - 1]).float()[0]  # type: ignore[operator]
        return row

    def _resume(self, seq: Running) -> torch.Tensor:
        """A resumed request, its prompt just prefilled: its given tokens go through the model as the
        decode steps that made them did, and the last one's logits choose the next token.

        Decode and prefill round differently in the last bits, so a replay that prefilled the given
        tokens could choose differently where two tokens were nearly tied. The native step runs the
        given tokens as rows of one call, in order (each row writes its keys and values before the
        next row attends), and computes every row as it would alone: the same numbers as one step
        each, in one pass over the weights. Elsewhere it takes one step per token."""
        tokens = seq.request.resumed
        now = time.perf_counter_ns()
        for token in tokens:  # history and grammar as if each had just been sampled
            if seq.constraint is not None:
                seq.constraint.accept(token)
            seq.history.append(token)
        seq.generated, seq.first_token_ns = len(tokens), now
        decoder = native_decoder(self.model)
        if decoder is not None and decoder.fits_pool(self.pool) and decoder.takes_tokens:
            if not seq.kv.reserve(len(tokens)):
                raise RuntimeError(f"the KV pool could not hold {len(tokens)} more tokens of request {seq.request.id}")
            ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
            positions = [seq.written + i for i in range(len(tokens))]
            logits = decoder.decode_paged(ids, positions, [seq.kv] * len(tokens), self.pool, logits=True)
            seq.kv.commit(list(tokens))
            seq.written += len(tokens)
            return logits[-1]
        row = torch.empty(0)
        for token in tokens:
            seq.pending = token
            row = self._decode([seq])[0]
        return row

    def _decode(self, seqs: list[Running]) -> torch.Tensor:
        """One token for each sequence, as one batch: (B, vocab slice) logits."""
        for seq in seqs:
            if not seq.kv.reserve(1):
                raise RuntimeError(f"the KV pool could not hold one more token of request {seq.request.id}")
        tokens = [seq.pending for seq in seqs]
        decoder = native_decoder(self.model)
        if decoder is not None and decoder.fits_pool(self.pool) and decoder.takes_tokens:
            # token ids to logits in one native call
            ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
            logits = decoder.decode_paged(ids, [s.written for s in seqs], [s.kv for s in seqs], self.pool, logits=True)
            self._commit(seqs, tokens)
            return logits
        hidden = self.hidden_rows(seqs)
        self._commit(seqs, tokens)
        return self.model.logits(hidden[:, -1]).float()  # type: ignore[operator]

    def hidden_rows(self, seqs: list[Running]) -> torch.Tensor:
        """Each sequence's pending token at its next position (reserved) through the model: (B, 1, H).
        Keys and values go to the pool; committing them is the caller's."""
        ids = torch.tensor([[seq.pending] for seq in seqs], dtype=torch.long, device=self.device)
        decoder = native_decoder(self.model)
        if decoder is not None and decoder.fits_pool(self.pool):
            return decoder.decode_paged(ids, [s.written for s in seqs], [s.kv for s in seqs], self.pool)
        positions = torch.tensor([[seq.written] for seq in seqs], dtype=torch.long, device=self.device)
        starts = [s.written for s in seqs]
        cache = PagedBatchCache(self.pool, [s.kv for s in seqs], starts, [1] * len(seqs), self.windows)
        hidden: torch.Tensor = self.model.hidden_states(ids, positions, cache)  # type: ignore[operator]
        return hidden

    def _commit(self, seqs: list[Running], tokens: list[int | None]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            seq.kv.commit([int(token)])  # type: ignore[arg-type]
            seq.written += 1

    def _sample(self, seq: Running, logits: torch.Tensor) -> Event:
        if seq.constraint is not None:
            logits = seq.constraint.restrict(logits)
        return self._accept(seq, seq.sampler(logits, seq.history))

    def _accept(self, seq: Running, token: int) -> Event:
        """The token picked for a sequence: its end, or its next pending token."""
        rid = seq.request.id
        now = time.perf_counter_ns()
        if seq.generated == 0:
            seq.first_token_ns = now
        if token in seq.request.eos:
            return self._finish(seq, "stop", now)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        seq.history.append(token)
        seq.generated += 1
        seq.pending = token
        if seq.generated >= seq.limit:
            event = self._finish(seq, "length", now)
            event.token = token
            return event
        return Event(rid, token)

    def _finish(self, seq: Running, reason: str, now: int) -> Event:
        seq.done_reason = reason
        stats = FinalStats(
            done_reason=reason,
            prompt_eval_count=len(seq.request.prompt),
            prompt_eval_duration=seq.prompt_ns,
            eval_count=seq.generated,
            eval_duration=now - seq.first_token_ns if seq.generated else 0,
            comm_duration=int(seq.comm_s * 1e9),
            cached_tokens=seq.cached,
        )
        return Event(seq.request.id, None, stats=stats)

    def _comm_seconds(self) -> float:
        return float(getattr(self.comm, "seconds", 0.0)) if self.comm is not None else 0.0


def generation_limit(n_prompt: int, options: GenerationOptions) -> int:
    """The tokens a request may generate: num_predict, within num_ctx."""
    limit = options.num_ctx - n_prompt
    return min(limit, options.num_predict) if options.num_predict >= 0 else limit


def positions_needed(n_prompt: int, options: GenerationOptions) -> int:
    """The KV positions a request may fill at most: its prompt and what it may generate, within num_ctx."""
    if options.num_predict < 0:
        return options.num_ctx
    return min(options.num_ctx, n_prompt + options.num_predict)


class Planner:
    """Rank 0's side: requests waiting to join, and the next step's plan. Admission reserves the KV
    blocks a request may need at most (prompt + what it may generate), so a running sequence never
    finds the pool full; a request that could never fit is refused up front."""

    def __init__(self, pool: BlockPool, max_running: int, chunk: int = PREFILL_CHUNK) -> None:
        self.pool, self.max_running, self.chunk = pool, max_running, chunk
        self.waiting: list[Request] = []
        self.reserved: dict[str, int] = {}  # blocks promised to each running request

    def need(self, request: Request) -> int:
        return int(self.pool.blocks_for(positions_needed(len(request.prompt), request.options)))

    def plan(self, batch: Batch, cancelled: set[str]) -> Plan:
        plan = Plan()
        for rid in cancelled:
            if rid in batch.running:
                plan.drop.append(rid)
                self.reserved.pop(rid, None)
        self.waiting = [r for r in self.waiting if r.id not in cancelled]
        free = self.pool.num_blocks - sum(self.reserved.values())
        running = len(batch.running) - len(plan.drop)
        while self.waiting and running < self.max_running and self.need(self.waiting[0]) <= free:
            request = self.waiting.pop(0)
            self.reserved[request.id] = self.need(request)
            free -= self.reserved[request.id]
            plan.add.append(request)
            running += 1
        dropped = set(plan.drop)
        live = [s for rid, s in batch.running.items() if rid not in dropped]
        # Prompt chunks, oldest request first, up to `chunk` tokens in all (at least one chunk).
        budget = self.chunk
        todo = [(s.request.id, len(s.request.prompt) - s.entered) for s in live if s.prefilling]
        todo += [(r.id, len(r.prompt) - self.pool.cached_prefix(r.prompt)) for r in plan.add]
        for rid, left in todo:
            if budget <= 0:
                break
            if left <= 0:  # the rest of its prompt is flowing through the stages
                continue
            n = min(left, budget)
            plan.prefill.append((rid, n))
            budget -= n
        ready = [s for s in live if not s.prefilling and s.pending is not None]
        if batch.flow is not None:  # pipeline stages: an even share enters each tick, the rest are in flight
            flying = batch.flow.flying()
            ready = [s for s in ready if s.request.id not in flying]
            ready = ready[: batch.flow.quota(len(ready), dropped)]
        plan.decode = [s.request.id for s in ready]
        return plan

    def finished(self, rid: str) -> None:
        self.reserved.pop(rid, None)
