"""Sampling across ranks that each hold a slice of the vocabulary gives the token the one-device sampler
gives on the whole row: greedy and top-k exactly, every draw with the same seed.

The ranks run as threads of this process over `ThreadGroup`, a test double of the communicator: its
all_gather and broadcast meet at a barrier and hand every thread the same stacked tensors, as the
real collectives do between processes (tests/parallel has those, end to end)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tp_ollama.engine.options import SamplingOptions
from tp_ollama.engine.sampler import Sampler
from tp_ollama.engine.sharded_sampling import ShardedSampler

WAIT_S = 30.0  # a barrier only a hang reaches


class ThreadGroup:
    """Test double: `world` threads, one per rank, meeting at a barrier for each collective."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=WAIT_S)
        self.slots: list[torch.Tensor | None] = [None] * world

    def rank(self, r: int) -> RankComm:
        return RankComm(self, r)


class RankComm:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        g = self.group
        g.slots[self.rank] = t.clone()
        g.barrier.wait()
        out = torch.stack([s for s in g.slots if s is not None])
        g.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.all_gather(t)[src]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_gather(t).sum(0)

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        raise NotImplementedError


def sharded_choices(
    options: SamplingOptions, logits: list[torch.Tensor], history: list[int], world: int
) -> list[tuple[int, ...]]:
    """Each rank's choice at every step, the vocabulary split into `world` uneven spans."""
    vocab = logits[0].numel()
    cuts = [0, *sorted({vocab * r // world + r for r in range(1, world)}), vocab]
    group = ThreadGroup(world)

    def rank(r: int) -> tuple[int, ...]:
        a, b = cuts[r], cuts[r + 1]
        sampler = ShardedSampler(options, vocab, (a, b), group.rank(r))
        return tuple(sampler(row[a:b], history) for row in logits)

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(rank, range(world)))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(temperature=0),
        SamplingOptions(temperature=0, repeat_penalty=1.3),
        SamplingOptions(temperature=0.8, top_k=5, seed=11),
        SamplingOptions(temperature=1.2, top_k=40, top_p=0.9, min_p=0.02, seed=3),
    ],
    ids=["greedy", "greedy-penalised", "top-k", "top-k-top-p-min-p"],
)
def test_the_ranks_agree_with_one_device(world, options):
    torch.manual_seed(0)
    logits = [torch.randn(97) * 3 for _ in range(12)]
    history = [4, 9, 4, 60]
    alone = Sampler(options, 97)
    want = tuple(alone(row, history) for row in logits)
    got = sharded_choices(options, logits, history, world)
    assert all(picks == want for picks in got), (got, want)


def test_an_untruncated_draw_is_the_same_on_every_rank():
    options = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=5)
    torch.manual_seed(1)
    logits = [torch.randn(50) for _ in range(20)]
    got = sharded_choices(options, logits, [], 3)
    assert got[0] == got[1] == got[2] and len(set(got[0])) > 1  # the same draws, and really draws
