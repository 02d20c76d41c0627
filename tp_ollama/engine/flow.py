"""Decode steps flowing through pipeline stages, so that with several sequences running every stage
works at once.

Without it a decode step runs the stages one after another: while stage 1 runs its layers, stage 0
waits. Here the decoding sequences are cut into as many groups as there are stages and each tick
moves every group one stage on: stage s runs the group that stage s - 1 ran the tick before, and
stage 0 takes a group whose tokens the last stage picked the tick before. With S stages and S groups
each stage is busy every tick; one sequence alone goes through the stages one tick each, as a plain
step would.

Prompt chunks flow the same way: a chunk entering stage 0 this tick reaches stage 1 the next, while
stage 0 takes the prompt's next chunk, so a long prompt fills every stage too. Each stage writes its
own layers' keys and values as a chunk passes, in order; the positions are committed when the chunk
leaves the last stage, and a prompt's last chunk brings its first token.

All ranks keep the same record of which sequences and chunks wait before which stage (`waiting`,
`chunks`); only the ranks of the stage that runs them next hold their hidden states (`handed`). A
tick is, on every rank in the same order: each stage's own chunks and group through its own layers
(Stage.alone), the hand-overs at each stage boundary (broadcasts from the stage's first rank), and
one broadcast of the tokens the last stage picked. The planner (engine/batch.py) decides which ready
sequences and which prompt chunks enter at stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tp_ollama.parallel.pipeline import Stage

Running = Any  # engine.batch.Running: a sequence, with its request, KV, sampler, constraint and history


class Rows(Protocol):
    """What the flow needs of engine.batch.Batch: its model and device, and a step of some rows."""

    model: Any
    device: torch.device

    def hidden_rows(self, seqs: list[Running]) -> torch.Tensor: ...

    def chunk_rows(self, chunk: Chunk) -> torch.Tensor: ...

    def prompt_logits(self, chunk: Chunk, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Chunk:
    """A prompt chunk in flight: `n` prompt tokens of `seq` from position `start`, run as `rows` rows
    (padded as Batch pads a prefill), entered at `t0_ns`."""

    seq: Running
    start: int
    n: int
    rows: int
    t0_ns: int

    @property
    def final(self) -> bool:
        return self.start + self.n == len(self.seq.request.prompt)


@dataclass
class Finished:
    """What left the last stage this tick: a decode row with its token, or a prompt chunk (`chunk`),
    with its prompt's first token when it was the prompt's last."""

    seq: Running
    token: int | None
    chunk: Chunk | None = None


class Flow:
    def __init__(self, batch: Rows, stage: Stage) -> None:
        self.batch, self.stage = batch, stage
        self.stages = stage.layout.stages
        self.hidden_size = int(batch.model.config.hidden_size)
        self.waiting: list[list[Running]] = [[] for _ in range(self.stages - 1)]  # [s]: ran stage s, next s + 1
        self.handed: torch.Tensor | None = None  # this rank's next input: the hidden states of waiting[index - 1]
        self.chunks: list[list[Chunk]] = [[] for _ in range(self.stages - 1)]  # as `waiting`, for prompt chunks
        self.chunks_handed: list[torch.Tensor] = []  # this rank's next inputs for chunks[index - 1]
        self.ticks = 0
        self.full_ticks = 0  # ticks in which every stage ran something

    def flying(self) -> set[str]:
        """The sequences between stages: their next token is not picked yet."""
        return {seq.request.id for lane in self.waiting for seq in lane}

    def quota(self, ready: int, dropped: set[str]) -> int:
        """How many of `ready` sequences enter this tick: an even share over the stage positions no group
        holds yet (4 sequences over 3 stages form groups of 2, 1 and 1; once every position holds a
        group, the ready ones are the group whose turn it is, and all enter)."""
        held = sum(any(seq.request.id not in dropped for seq in lane) for lane in self.waiting)
        return -(-ready // (self.stages - held))

    def drop(self, rid: str) -> None:
        """A sequence leaves (cancelled): its row and its chunks go from the hidden states they had."""
        mine = self.stage.index
        for s, lane in enumerate(self.waiting):
            for i, seq in enumerate(lane):
                if seq.request.id == rid:
                    del lane[i]
                    if s + 1 == mine and self.handed is not None:
                        self.handed = torch.cat((self.handed[:i], self.handed[i + 1 :]))
                    break
        for s, chunks in enumerate(self.chunks):
            keep = [i for i, c in enumerate(chunks) if c.seq.request.id != rid]
            if s + 1 == mine and len(keep) < len(chunks) and self.chunks_handed:
                self.chunks_handed = [self.chunks_handed[i] for i in keep]
            self.chunks[s] = [chunks[i] for i in keep]

    def tick(self, entering: list[Running], chunks: list[Chunk]) -> list[Finished]:
        """Move every group and chunk one stage on, `entering` and `chunks` into stage 0; what the last
        stage finished, with the tokens picked (the caller commits them)."""
        stage, batch = self.stage, self.batch
        for seq in entering:
            if not seq.kv.reserve(1):
                raise RuntimeError(f"the KV pool could not hold one more token of request {seq.request.id}")
        work, pre = [entering, *self.waiting], [chunks, *self.chunks]
        self.ticks += 1
        self.full_ticks += all(w or p for w, p in zip(work, pre, strict=True))
        me = stage.index
        chunk_out: list[torch.Tensor] = []
        chunk_logits: list[torch.Tensor | None] = []
        for i, c in enumerate(pre[me]):
            with stage.alone(None if stage.first else self.chunks_handed[i]):
                h = batch.chunk_rows(c)
            if stage.last:
                chunk_logits.append(batch.prompt_logits(c, h) if c.final else None)
            else:
                chunk_out.append(h.float().contiguous())
        out: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        if work[me]:
            with stage.alone(None if stage.first else self.handed):
                hidden = batch.hidden_rows(work[me])
            if stage.last:
                logits = batch.model.logits(hidden[:, -1]).float()
            else:
                out = hidden.float().contiguous()
        handed, chunks_handed = None, []
        for s in range(self.stages - 1):
            if work[s]:
                handed_s = self._hand_over(out if s == me else None, (len(work[s]), 1, self.hidden_size), s)
                handed = handed_s if s + 1 == me else handed
            for j, c in enumerate(pre[s]):
                x = self._hand_over(chunk_out[j] if s == me else None, (1, c.rows, self.hidden_size), s)
                if s + 1 == me:
                    chunks_handed.append(x)
        self.handed, self.waiting = handed, work[:-1]
        self.chunks_handed, self.chunks = chunks_handed, pre[:-1]
        empty = torch.empty(0, device=batch.device)
        rows = [(seq, logits[i] if logits is not None else empty) for i, seq in enumerate(work[-1])]
        finals: list[tuple[Running, torch.Tensor]] = []
        for j, c in enumerate(pre[-1]):
            row = chunk_logits[j] if stage.last else empty
            if c.final:
                assert row is not None
                finals.append((c.seq, row))
        tokens = self._pick([*rows, *finals])
        done = [Finished(seq, t) for (seq, _), t in zip(rows, tokens, strict=False)]
        picked = iter(tokens[len(rows) :])
        done += [Finished(c.seq, next(picked) if c.final else None, c) for c in pre[-1]]
        return done

    def _hand_over(self, mine: torch.Tensor | None, shape: tuple[int, ...], s: int) -> torch.Tensor:
        """Stage s's hidden states to every rank (the next stage keeps them): a broadcast from its first rank."""
        x = mine if mine is not None else torch.empty(shape, dtype=torch.float32, device=self.batch.device)
        return self.stage.comm.broadcast(x, src=self.stage.sources[s])

    def _pick(self, rows: list[tuple[Running, torch.Tensor]]) -> list[int]:
        """The last stage's tokens for these rows (logits there, empty elsewhere), broadcast in one go."""
        if not rows:
            return []
        stage, picks = self.stage, []
        for seq, row in rows:
            if seq.constraint is not None:  # every rank: the mask comes from rank 0
                row = seq.constraint.restrict(row)
            pick: Any = getattr(seq.sampler, "pick")  # noqa: B009  (a PipelineSampler)
            picks.append(pick(row, seq.history) if stage.last else 0)
        tokens = stage.comm.broadcast(torch.tensor(picks, dtype=torch.int64), src=stage.sources[-1])
        return [int(t) for t in tokens]
