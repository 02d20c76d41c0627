"""tp_ollama.parallel.fastcomm_shm: two ranks in threads of this process attach one segment and run every
collective through it; the segment's name is gone once both mapped it, a segment of another size is refused,
and a peer that never arrives is named when the timeout ends the wait (between processes, with a peer that
dies: test_fastcomm.py)."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tp_ollama.parallel.fastcomm_base import CommError
from tp_ollama.parallel.fastcomm_shm import HEADER, LINE, SHM_DIR, ShmTransport, segment_size

MAX_BYTES = 1024
ANSWER_TIMEOUT = 60.0


def test_the_segment_holds_a_counter_line_per_rank_and_two_aligned_slots_per_rank():
    assert segment_size(2, 1024) == 2 * LINE + 2 * 2 * (HEADER + 1024)
    assert segment_size(3, 100) == 3 * LINE + 2 * 3 * (HEADER + 128)  # payloads padded to 64 bytes


def in_threads(world: int, body: Callable[[ShmTransport], Any]) -> list[Any]:
    """body(transport) on `world` ranks, each a thread of this process; their results by rank."""
    store = dist.HashStore()
    results: list[Any] = [None] * world
    failures: list[str] = []

    def rank_main(rank: int) -> None:
        try:
            shm, why = ShmTransport.attach(store, "t/", rank, world, MAX_BYTES, 20.0, 0.0)
            assert shm is not None, why
            try:
                results[rank] = body(shm)
            finally:
                shm.close()
        except BaseException:
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ANSWER_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    assert failures == []
    return results


def ours() -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"tp_ollama_fc_{os.getpid()}_")]


def test_two_ranks_run_every_collective_through_one_segment_that_has_no_name_left():
    def collectives(shm: ShmTransport) -> dict[str, Any]:
        rank = shm.rank
        out: dict[str, Any] = {"names_while_open": ours()}
        x = torch.full((5,), float(rank + 1))
        shm.all_reduce(x)
        out["sum"] = x.tolist()
        t = torch.arange(6, dtype=torch.uint8) if rank == 1 else torch.zeros(6, dtype=torch.uint8)
        shm.broadcast(t, src=1)
        out["broadcast"] = t.tolist()
        out["gathered"] = shm.all_gather(torch.tensor([rank, 7], dtype=torch.uint8)).tolist()
        out["bytes"] = shm.broadcast_bytes(b"hello" if rank == 0 else None, 0, big_ok=False)
        out["announced"] = shm.broadcast_bytes(b"x" * (MAX_BYTES + 1) if rank == 0 else None, 0, big_ok=True)
        try:
            shm.broadcast_bytes(b"x" * (MAX_BYTES + 1) if rank == 1 else None, 1, big_ok=False)
        except CommError as e:
            out["too_big"] = str(e)
        shm.barrier()
        return out

    results = in_threads(2, collectives)
    for r in results:
        assert r["names_while_open"] == []  # unlinked as soon as both ranks mapped it
        assert r["sum"] == [3.0] * 5
        assert r["broadcast"] == list(range(6))
        assert r["gathered"] == [[0, 7], [1, 7]]
        assert r["bytes"] == b"hello"
        assert r["announced"] == MAX_BYTES + 1  # over max_bytes: every rank learns the length, the caller moves it
        assert f"rank 1 sends {MAX_BYTES + 1} bytes" in r["too_big"]
    assert ours() == []


def test_a_closed_transport_refuses_collectives():
    closed = in_threads(2, lambda shm: shm)
    with pytest.raises(CommError, match="the shared-memory group of rank 0 is closed"):
        closed[0].barrier()


def test_a_segment_of_another_size_is_refused(tmp_path):
    path = tmp_path / "segment"
    path.write_bytes(b"\0" * 100)
    expected = segment_size(2, MAX_BYTES)
    with pytest.raises(CommError, match=rf"segment {path} has 100 bytes, expected {expected}"):
        ShmTransport(str(path), 0, 2, MAX_BYTES, 1.0, 0.0)


def test_a_peer_that_never_arrives_is_named_when_the_timeout_ends_the_wait(tmp_path):
    path = tmp_path / "segment"
    path.write_bytes(b"\0" * segment_size(2, MAX_BYTES))
    alone = ShmTransport(str(path), 0, 2, MAX_BYTES, 0.5, 0.0)  # rank 1 never maps it
    with pytest.raises(
        CommError, match=r"all_reduce: rank 0 waited 0\.5 s \(the timeout\) for rank\(s\) 1 to reach round 1"
    ):
        alone.all_reduce(torch.ones(4))
    alone.close()
