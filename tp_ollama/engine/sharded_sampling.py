"""Choosing the next token when each rank holds the logits of a vocabulary range only.

No rank ever sees a full vocabulary row. Each rank reduces its slice to a few candidates and one
all-gather exchanges them; every rank then runs the same chain on the same candidates with the
same random numbers (engine.sampler.random_stream of the seed and position), so all ranks pick the
same token:
- greedy: the per-rank maximum (ties go to the lowest global id, as torch.argmax would);
- top_k > 0: the per-rank top k, then llama.cpp's chain on the k x world candidates — exactly
  what the single-device sampler computes;
- no truncation: Gumbel-max, argmax(logits / T + Gumbel noise), an exact draw from the softmax;
  the noise for the whole vocabulary comes from the shared stream and each rank takes its slice;
- top_k = 0 with top_p / min_p / typical_p: the chain on the per-rank top CANDIDATE_CAP; exact
  unless the nucleus holds more tokens than that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from tp_ollama.engine.options import SamplingOptions
from tp_ollama.engine.sampler import (
    Sampler,
    apply_penalties,
    draw,
    greedy,
    history_window,
    min_p,
    random_stream,
    top_p,
    typical_p,
)
from tp_ollama.parallel.comm import Comm
from tp_ollama.parallel.layout import Span
from tp_ollama.parallel.pipeline import Stage

CANDIDATE_CAP = 1024


class ShardedSampler:
    def __init__(self, options: SamplingOptions, vocab_size: int, span: Span, comm: Comm) -> None:
        self.inner = Sampler(options, vocab_size)  # the seed, shared by construction
        if options.seed is None or options.seed < 0:
            # A random seed must still be the same on every rank: rank 0's wins.
            seed = torch.tensor([self.inner.seed], dtype=torch.int64)
            self.inner.seed = int(comm.broadcast(seed, src=0)[0])
        self.options, self.vocab_size, self.span, self.comm = options, vocab_size, span, comm

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: (span length,) this rank's slice; history: every token so far (same on all ranks)."""
        o, (a, b) = self.options, self.span
        local = [t - a for t in history_window(history, o.repeat_last_n) if a <= t < b]
        scores = apply_penalties(logits.float(), local, o)
        if o.greedy:
            return self._best(scores)
        truncates = 0 < o.top_k < self.vocab_size or o.top_p < 1 or o.min_p > 0 or o.typical_p < 1
        if not truncates:
            stream = random_stream(self.inner.seed, len(history))
            noise = -torch.log(-torch.log(torch.rand(self.vocab_size, generator=stream)))
            return self._best(scores / o.temperature + noise[a:b].to(scores.device))
        k = min(o.top_k if o.top_k > 0 else CANDIDATE_CAP, b - a)
        values, ids = (x.cpu() for x in torch.topk(scores, k))  # the exchange and chain run on the host
        mine = torch.stack((values.double(), (ids + a).double()))  # (2, k)
        both = self._gather_padded(mine, o.top_k if o.top_k > 0 else CANDIDATE_CAP)  # (world, 2, kmax)
        values = both[:, 0].reshape(-1).float()
        ids = both[:, 1].reshape(-1).long()
        # Sort descending by logit, lowest id first on ties, as a single-device topk would.
        by_id = torch.argsort(ids, stable=True)
        values, ids = values[by_id], ids[by_id]
        by_value = torch.argsort(values, descending=True, stable=True)
        if o.top_k > 0:
            by_value = by_value[: o.top_k]
        cands = (values[by_value], ids[by_value])
        cands = typical_p(cands, o.typical_p)
        cands = top_p(cands, o.top_p)
        cands = min_p(cands, o.min_p)
        return draw(cands, o.temperature, random_stream(self.inner.seed, len(history)))

    def _best(self, scores: torch.Tensor) -> int:
        """Global arg-max from each rank's local maximum: one all-gather of (value, id)."""
        i = greedy(scores)
        mine = torch.tensor([float(scores[i]), float(i + self.span[0])], dtype=torch.float64)
        both = self.comm.all_gather(mine)  # (world, 2)
        best = max(range(both.shape[0]), key=lambda r: (float(both[r, 0]), -float(both[r, 1])))
        return int(both[best, 1])

    def _gather_padded(self, mine: torch.Tensor, kmax: int) -> torch.Tensor:
        """All-gather (2, k) candidates; ranks with fewer than kmax rows pad with -inf logits."""
        pad = kmax - mine.shape[1]
        if pad > 0:
            filler = torch.tensor([[-math.inf], [-1.0]], dtype=torch.float64).expand(2, pad)
            mine = torch.cat((mine, filler), dim=1)
        return self.comm.all_gather(mine.contiguous())


class PipelineSampler:
    """Picks the next token on the last stage (which holds the logits) and broadcasts it to the rest.
    A random seed is rank 0's, so that a later regroup that moves the last stage draws the same. With
    TP inside the last stage (hybrid) its ranks hold vocabulary slices (`span`) and pick together as
    ShardedSampler does, over the stage's communicator."""

    def __init__(self, options: SamplingOptions, vocab_size: int, stage: Stage, span: Span | None = None) -> None:
        self.stage = stage
        if options.seed is None or options.seed < 0:
            seed = torch.tensor([Sampler(options, vocab_size).seed], dtype=torch.int64)
            options = replace(options, seed=int(stage.comm.broadcast(seed, src=0)[0]))
        self.inner: Callable[[torch.Tensor, Sequence[int]], int]
        if stage.last and stage.tp_comm is not None and stage.tp_comm.world_size > 1:
            self.inner = ShardedSampler(options, vocab_size, span or (0, vocab_size), stage.tp_comm)
        else:
            self.inner = Sampler(options, vocab_size)

    def pick(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """The token, on the last stage alone (the caller hands it to the others)."""
        return self.inner(logits, history)

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        token = torch.tensor([self.inner(logits, history) if self.stage.last else 0], dtype=torch.int64)
        return int(self.stage.comm.broadcast(token, src=self.stage.sources[-1])[0])
