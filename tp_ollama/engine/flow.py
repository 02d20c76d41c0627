"""Decode steps flowing through pipeline stages, so that with several sequences running every stage
works at once.

Without it a decode step runs the stages one after another: while stage 1 runs its layers, stage 0
waits. Here the decoding sequences are cut into as many groups as there are stages and each tick
moves every group one stage on: stage s runs the group that stage s - 1 ran the tick before, and
stage 0 takes a group whose tokens the last stage picked the tick before. With S stages and S groups
each stage is busy every tick; one sequence alone goes through the stages one tick each, as a plain
step would.

All ranks keep the same record of which sequences wait before which stage (`waiting`); only the
ranks of the stage that runs a group next hold its hidden states (`handed`). A tick is, on every
rank in the same order: each stage's own group through its own layers (Stage.alone), one hand-over
per stage boundary (a broadcast from the stage's first rank), and one broadcast of the tokens the
last stage picked. The planner (engine/batch.py) decides which ready sequences enter at stage 0.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tp_ollama.parallel.pipeline import Stage

Running = Any  # engine.batch.Running: a sequence, with its request, KV, sampler, constraint and history


class Rows(Protocol):
    """What the flow needs of engine.batch.Batch: its model and device, and a step of some rows."""

    model: Any
    device: torch.device

    def hidden_rows(self, seqs: list[Running]) -> torch.Tensor: ...


class Flow:
    def __init__(self, batch: Rows, stage: Stage) -> None:
        self.batch, self.stage = batch, stage
        self.stages = stage.layout.stages
        self.hidden_size = int(batch.model.config.hidden_size)
        self.waiting: list[list[Running]] = [[] for _ in range(self.stages - 1)]  # [s]: ran stage s, next s + 1
        self.handed: torch.Tensor | None = None  # this rank's next input: the hidden states of waiting[index - 1]
        self.ticks = 0
        self.full_ticks = 0  # ticks in which every stage ran a group

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
        """A sequence leaves between stages (cancelled): its row goes from the hidden states it had."""
        for s, lane in enumerate(self.waiting):
            for i, seq in enumerate(lane):
                if seq.request.id == rid:
                    del lane[i]
                    if s + 1 == self.stage.index and self.handed is not None:
                        self.handed = torch.cat((self.handed[:i], self.handed[i + 1 :]))
                    return

    def tick(self, entering: list[Running]) -> list[tuple[Running, int]]:
        """Move every group one stage on, `entering` into stage 0; the sequences the last stage
        finished, with their tokens (the caller commits them)."""
        stage, batch, comm = self.stage, self.batch, self.stage.comm
        for seq in entering:
            if not seq.kv.reserve(1):
                raise RuntimeError(f"the KV pool could not hold one more token of request {seq.request.id}")
        work = [entering, *self.waiting]
        self.ticks += 1
        self.full_ticks += all(work)
        mine = work[stage.index]
        out: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        if mine:
            with stage.alone(None if stage.first else self.handed):
                hidden = batch.hidden_rows(mine)
            if stage.last:
                logits = batch.model.logits(hidden[:, -1]).float()
            else:
                out = hidden.float().contiguous()
        handed = None
        for s in range(self.stages - 1):
            if not work[s]:
                continue
            shape = (len(work[s]), 1, self.hidden_size)
            x = out if s == stage.index else torch.empty(shape, dtype=torch.float32, device=batch.device)
            assert x is not None
            x = comm.broadcast(x, src=stage.sources[s])
            if s + 1 == stage.index:
                handed = x
        self.handed, self.waiting = handed, work[:-1]
        done = work[-1]
        if not done:
            return []
        picks = []
        for i, seq in enumerate(done):
            row = logits[i] if logits is not None else torch.empty(0, device=batch.device)
            if seq.constraint is not None:  # every rank: the mask comes from rank 0
                row = seq.constraint.restrict(row)
            pick: Any = getattr(seq.sampler, "pick")  # noqa: B009  (a PipelineSampler)
            picks.append(pick(row, seq.history) if stage.last else 0)
        tokens = comm.broadcast(torch.tensor(picks, dtype=torch.int64), src=stage.sources[-1])
        return list(zip(done, (int(t) for t in tokens), strict=True))
