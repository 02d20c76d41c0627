"""FastGroup between real processes: exact rank-ordered sums, the other collectives, a dead peer, cleanup.

Three worker processes are spawned once for the module (importing torch costs ~2 s each on 2 cores) and run
one scenario per call; two-rank scenarios use the first two. Every wait here has a timeout.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.kernels.test_quant import needs_native
from tp_ollama.kernels import native
from tp_ollama.parallel.fastcomm import FastGroup
from tp_ollama.parallel.fastcomm_base import CommError

ANSWER_TIMEOUT = 60.0  # seconds a scenario may take before the test fails instead of hanging
SHM_TAG = "tp_ollama_fc_"


# ---------------------------------------------------------------- worker side (runs in spawned processes)


def _serve(conn: Connection, port: int) -> None:
    """Worker loop: run (fn, rank, world, kwargs) requests until told to stop; answer (ok, value or traceback)."""
    torch.set_num_threads(1)  # 3 workers share 2 cores
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    while True:
        if not conn.poll(300):
            return  # the test process is gone
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        fn, rank, world, kwargs = request
        try:
            conn.send((True, fn(store, rank, world, **kwargs)))
        except BaseException:
            conn.send((False, traceback.format_exc()))


def _inputs(seed: int, size: int, dtype: torch.dtype, world: int) -> list[torch.Tensor]:
    """Every rank's input for one round, the same on all ranks; magnitudes differ per rank so that the order
    of summation changes the float result."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return [torch.randint(-(10**12), 10**12, (size,), generator=gen) for _ in range(world)]
    return [(torch.randn(size, generator=gen) * 10.0**p).to(dtype) for p in range(world)]


def _shm_mapped() -> list[str]:
    """Paths of this process's fastcomm shared-memory mappings (a mapping's path ends in ' (deleted)' once
    unlinked)."""
    with open("/proc/self/maps") as f:
        return [line.split(maxsplit=5)[5].strip() for line in f if SHM_TAG in line]


def _reduce_rounds(
    store: dist.Store, rank: int, world: int, *, transport: str, name: str, dtype: torch.dtype, rounds: int
) -> dict[str, Any]:
    digest = hashlib.sha256()
    wrong = []
    order_matters = 0  # rounds where another association gives other bits: proof the check can fail
    with FastGroup.create(store, rank, world, transport=transport, name=name, timeout=20) as g:
        mapped_while_open = _shm_mapped()
        for i in range(rounds):
            for size in (1, 640, 100_000) if i % 10 == 0 else (1, 640):
                xs = _inputs(i * 1_000_003 + size, size, dtype, world)
                expected = xs[0].clone()
                for x in xs[1:]:
                    expected += x  # rank order, in the tensor's dtype
                if world > 2 and not torch.equal(xs[0] + (xs[1] + xs[2]), expected):
                    order_matters += 1
                got = g.all_reduce(xs[rank])
                if not torch.equal(got, expected):
                    wrong.append((i, size))
                digest.update(got.view(torch.uint8).numpy().tobytes())
        stats = dict(g.stats)
        used = g.transport
    return {
        "transport": used,
        "wrong": wrong,
        "order_matters": order_matters,
        "digest": digest.hexdigest(),
        "stats": stats,
        "mapped_while_open": mapped_while_open,
        "mapped_after_close": _shm_mapped(),
    }


def _native_reduce_rounds(store: dist.Store, rank: int, world: int, *, name: str) -> dict[str, Any]:
    """The shared-memory all-reduce called as a native decode step calls it (the C function through
    its pointer), interleaved with the Python transport's collectives on the same rounds; then a
    round that the last rank skips, which must fail on the timeout and name it."""

    from tp_ollama.models.native_structs import REDUCE_FN

    wrong, out = [], {}
    with FastGroup.create(store, rank, world, transport="shm", name=name, timeout=20) as g:
        native = g.native_all_reduce()
        call = REDUCE_FN(native.fn)
        for i in range(60):
            xs = _inputs(i, 640 if i % 3 else 1, torch.float32, world)
            expected = xs[0].clone()
            for x in xs[1:]:
                expected += x
            mine = xs[rank].clone()
            if i % 2:
                assert call(native.ctx, mine.data_ptr(), mine.numel()) == 0
            else:
                g.all_reduce(mine)
            if not torch.equal(mine, expected):
                wrong.append(i)
        out["settled"] = native.settle()[0]
        out["bcast"] = g.broadcast(torch.full((3,), float(rank)), src=world - 1).tolist()
    with FastGroup.create(store, rank, world, transport="shm", name=name + "-t", timeout=1) as g:
        native = g.native_all_reduce()
        if rank != world - 1:
            x = torch.ones(8)
            t0 = time.perf_counter()
            assert REDUCE_FN(native.fn)(native.ctx, x.data_ptr(), 8) == 1
            out["timeout"] = (str(native.error()), time.perf_counter() - t0)
        g_closed = g
    out["after_close"] = g_closed.native_all_reduce() is None
    out["wrong"] = wrong
    return out


def _other_collectives(store: dist.Store, rank: int, world: int, *, transport: str, name: str) -> dict[str, Any]:
    max_bytes = 4096
    errors: list[str] = []
    with FastGroup.create(store, rank, world, transport=transport, name=name, max_bytes=max_bytes, timeout=20) as g:
        for src in range(world):
            for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
                want = (torch.arange(15) * (src + 1) % 7).to(dtype).view(3, 5)
                t = want.clone() if rank == src else torch.zeros(3, 5, dtype=dtype)
                assert g.broadcast(t, src=src) is t
                assert torch.equal(t, want), (src, dtype, t)
            strided = torch.zeros(5, 3).t()  # not contiguous
            if rank == src:
                strided.copy_(torch.arange(15.0).view(3, 5))
            g.broadcast(strided, src=src)
            assert torch.equal(strided, torch.arange(15.0).view(3, 5))
            for n in (0, 1, 63, 64, 65, 1000, max_bytes):
                payload = bytes((src * 31 + i) % 256 for i in range(n))
                got = g.broadcast_bytes(payload if rank == src else None, src=src)
                assert got == payload, (src, n, len(got))
        gathered = g.all_gather(torch.tensor([rank, 10 * rank], dtype=torch.float32).view(2, 1))
        assert gathered.shape == (world, 2, 1)
        assert torch.equal(gathered, torch.tensor([[[p], [10 * p]] for p in range(world)], dtype=torch.float32))
        scalars = g.all_gather(torch.tensor(rank + 100, dtype=torch.int64))
        assert scalars.tolist() == [p + 100 for p in range(world)]
        flags = g.all_gather(torch.tensor([rank % 2 == 0, True]))
        assert flags.tolist() == [[p % 2 == 0, True] for p in range(world)]
        cols = torch.ones(4, 6)[:, ::2]  # not contiguous: reduced through a contiguous copy
        g.all_reduce(cols)
        assert torch.equal(cols, torch.full((4, 3), float(world)))
        assert g.all_reduce(torch.zeros(0, 640)).shape == (0, 640)
        g.barrier()
        # Too big for max_bytes and no process group to fall back on: every rank raises, and the group
        # stays usable because every rank saw the same announcement.
        try:
            g.broadcast_bytes(b"x" * (max_bytes + 1) if rank == 0 else None, src=0)
        except CommError as e:
            errors.append(str(e))
        # A tensor too big for max_bytes with no process group of these ranks (a pipeline stage's
        # sub-group) is reduced and broadcast in pieces of max_bytes, with the same sums.
        big = torch.arange(max_bytes, dtype=torch.float32) + rank
        g.all_reduce(big)
        assert torch.equal(big, torch.arange(max_bytes, dtype=torch.float32) * world + sum(range(world)))
        wide = torch.full((max_bytes + 3,), float(rank), dtype=torch.float32)
        g.broadcast(wide, src=world - 1)
        assert torch.equal(wide, torch.full((max_bytes + 3,), float(world - 1)))
        x = torch.tensor([float(rank)])
        g.all_reduce(x)
        assert x.item() == sum(range(world))
        stats = dict(g.stats)
    return {"stats": stats, "errors": errors}


def _mismatch(store: dist.Store, rank: int, world: int, *, transport: str, name: str) -> str:
    """Rank 0 all-reduces while the others broadcast: everyone must fail fast, naming both collectives."""
    with FastGroup.create(store, rank, world, transport=transport, name=name, timeout=30) as g:
        try:
            if rank == 0:
                g.all_reduce(torch.zeros(8))
            else:
                g.broadcast(torch.zeros(8), src=0)
        except CommError as e:
            return str(e)
    return "no error"


def _with_process_group(store: dist.Store, rank: int, world: int, *, transport: str, name: str) -> dict[str, Any]:
    """With a gloo group initialised, what the fast path cannot carry goes through torch.distributed; the group
    is bootstrapped from the default store as in production."""
    dist.init_process_group("gloo", store=dist.PrefixStore(name, store), rank=rank, world_size=world)
    try:
        default = dist.distributed_c10d._get_default_store()
        with FastGroup.create(default, rank, world, transport=transport, max_bytes=256, timeout=20) as g:
            big = torch.full((1000,), float(rank + 1))
            g.all_reduce(big)
            assert torch.equal(big, torch.full((1000,), float(sum(range(1, world + 1)))))
            small = torch.tensor([rank + 1.0])
            g.all_reduce(small)
            assert small.item() == sum(range(1, world + 1))
            u8 = torch.tensor([rank + 1], dtype=torch.uint8)  # not a dtype the fast path reduces
            g.all_reduce(u8)
            assert u8.item() == sum(range(1, world + 1))
            payload = bytes(range(256)) * 10
            assert g.broadcast_bytes(payload if rank == 0 else None) == payload
            rows = g.all_gather(torch.full((100,), float(rank)))
            assert torch.equal(rows, torch.arange(world, dtype=torch.float32)[:, None].expand(world, 100))
            return {"stats": dict(g.stats), "transport": g.transport}
    finally:
        dist.destroy_process_group()


def _early_exit(store: dist.Store, rank: int, world: int, *, name: str) -> dict[str, Any]:
    """The last rank exits after one all-reduce on each transport; the others must raise at once, on
    shared memory from Python and from the native all-reduce alike."""
    from tp_ollama.models.native_structs import REDUCE_FN

    shm = FastGroup.create(store, rank, world, transport="shm", name=name + "-shm", timeout=2)
    tcp = FastGroup.create(store, rank, world, transport="tcp", name=name + "-tcp", timeout=2)
    nat = FastGroup.create(store, rank, world, transport="shm", name=name + "-nat", timeout=2)
    for g in (shm, tcp, nat):
        g.all_reduce(torch.ones(640))
    if rank == world - 1:
        os._exit(0)
    out: dict[str, Any] = {}
    for label, g in (("shm", shm), ("tcp", tcp)):
        start = time.monotonic()
        try:
            g.all_reduce(torch.ones(640))
            out[label] = ("no error", 0.0)
        except CommError as e:
            out[label] = (str(e), time.monotonic() - start)  # the time it waited before it raised
        g.close()
        g.close()  # idempotent
    native = nat.native_all_reduce()
    if native is not None:
        x = torch.ones(640)
        start = time.monotonic()
        rc = REDUCE_FN(native.fn)(native.ctx, x.data_ptr(), x.numel())
        out["native"] = (str(native.error()) if rc else "no error", time.monotonic() - start)
    nat.close()
    out["mapped_after_close"] = _shm_mapped()
    return out


def _master_store() -> dist.TCPStore:
    """A store server on a free loopback port (port 0: the OS picks; clients read .port)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


class Cluster:
    """Worker processes that run scenario functions on request, spawned once and restarted if one died."""

    def __init__(self, size: int) -> None:
        self._ctx = mp.get_context("spawn")
        self.store = _master_store()
        self._procs: list[Any] = [None] * size
        self._conns: list[Connection | None] = [None] * size
        for i in range(size):
            self._start(i)

    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child, self.store.port), daemon=True)
        proc.start()
        child.close()
        self._procs[i], self._conns[i] = proc, parent

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, fn: Callable[..., Any], world: int, *, exits: frozenset[int] = frozenset(), **kw: Any) -> list[Any]:
        """fn(store, rank, world, **kw) on workers 0..world-1; results by rank (None for ranks in `exits`, which
        must end their process)."""
        for rank in range(world):
            if not self._procs[rank].is_alive():
                self._start(rank)
        for rank in range(world):
            conn = self._conns[rank]
            assert conn is not None
            conn.send((fn, rank, world, kw))
        results: list[Any] = []
        failed: list[str] = []
        for rank in range(world):
            conn = self._conns[rank]
            assert conn is not None
            if rank in exits:
                self._procs[rank].join(ANSWER_TIMEOUT)
                assert not self._procs[rank].is_alive(), f"worker {rank} should have exited"
                results.append(None)
                continue
            if not conn.poll(ANSWER_TIMEOUT):
                raise AssertionError(f"worker {rank} gave no answer within {ANSWER_TIMEOUT} s running {fn.__name__}")
            ok, value = conn.recv()
            if not ok:
                failed.append(f"worker {rank} failed in {fn.__name__}:\n{value}")
            results.append(value)
        assert not failed, "\n".join(failed)
        return results

    def close(self) -> None:
        for proc, conn in zip(self._procs, self._conns, strict=True):
            if proc.is_alive() and conn is not None:
                conn.send(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(3)
    yield c
    c.close()
    leftovers = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"{SHM_TAG}{pid}_") for pid in c.pids())]
    assert leftovers == [], f"shared-memory segments left behind: {leftovers}"


def _name() -> str:
    return uuid.uuid4().hex  # a fresh group name per scenario: the module's store outlives every group


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_all_reduce_is_the_rank_ordered_sum_on_every_rank(cluster: Cluster, world: int, transport: str) -> None:
    res = cluster.run(_reduce_rounds, world, transport=transport, name=_name(), dtype=torch.float32, rounds=200)
    for r in res:
        assert r["transport"] == transport
        assert r["wrong"] == [], f"rounds (round, size) whose sum differs from the rank-ordered sum: {r['wrong'][:5]}"
        assert r["stats"]["all_reduce"] == 200 * 2 + 20
        assert r["stats"]["broadcast"] == 0
        assert r["mapped_after_close"] == []
        assert world == 2 or r["order_matters"] > 100
    assert len({r["digest"] for r in res}) == 1, "ranks disagree on the bytes of the result"
    if transport == "shm":  # mapped while open, but already unlinked: a killed process leaves nothing behind
        assert all(m and all(path.endswith(" (deleted)") for path in m) for m in (r["mapped_while_open"] for r in res))


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64], ids=["bf16", "f16", "i64"])
def test_all_reduce_other_dtypes_three_ranks(cluster: Cluster, transport: str, dtype: torch.dtype) -> None:
    res = cluster.run(_reduce_rounds, 3, transport=transport, name=_name(), dtype=dtype, rounds=20)
    assert [r["wrong"] for r in res] == [[], [], []]
    assert len({r["digest"] for r in res}) == 1


@needs_native
@pytest.mark.parametrize("world", [2, 3])
def test_native_all_reduce_keeps_the_protocol_of_the_python_one(cluster: Cluster, world: int) -> None:
    res = cluster.run(_native_reduce_rounds, world, name=_name())
    for rank, r in enumerate(res):
        assert r["wrong"] == [], f"rank {rank}: rounds whose sum differs from the rank-ordered sum: {r['wrong'][:5]}"
        assert r["settled"] == 30  # its own calls, for the communicator's counts
        assert r["bcast"] == [float(world - 1)] * 3  # a Python collective after native rounds
        assert r["after_close"]
        if rank != world - 1:
            msg, waited = r["timeout"]
            assert f"for rank {world - 1}" in msg and "1 s (the timeout)" in msg and waited > 0.9, msg


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_broadcast_all_gather_broadcast_bytes_barrier(cluster: Cluster, world: int, transport: str) -> None:
    res = cluster.run(_other_collectives, world, transport=transport, name=_name())
    for r in res:
        assert r["stats"] == {
            "all_reduce": 4,
            "broadcast": 5 * world + 1,
            "all_gather": 3,
            "broadcast_bytes": 7 * world + 1,
            "barrier": 1,
        }
        assert len(r["errors"]) == 1
        assert "max_bytes=4096" in r["errors"][0] and "no torch.distributed process group" in r["errors"][0]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_ranks_calling_different_collectives_fail_fast(cluster: Cluster, transport: str) -> None:
    messages = cluster.run(_mismatch, 3, transport=transport, name=_name())
    # The broadcast's receivers see rank 0's all_reduce message. Over TCP they send rank 0 nothing, so rank 0
    # learns of the failure from their closed connections; on shm it reads what they entered.
    for m in messages[1:] if transport == "tcp" else messages:
        assert "all_reduce" in m and "broadcast" in m and "different collectives" in m, m
    assert messages[0] != "no error"
    # Fast: found by the check on what the others entered (or by their closed connections), not by the timeout.
    assert not any("(the timeout)" in m for m in messages), messages


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_falls_back_to_torch_distributed_beyond_max_bytes(cluster: Cluster, transport: str) -> None:
    for r in cluster.run(_with_process_group, 2, transport=transport, name=_name()):
        assert r["transport"] == ("shm" if transport == "auto" else "tcp")
        s = r["stats"]
        assert (s["all_reduce"], s["fallback_all_reduce"]) == (3, 2)
        assert (s["broadcast_bytes"], s["fallback_broadcast_bytes"]) == (1, 1)
        assert (s["all_gather"], s["fallback_all_gather"]) == (1, 1)


def test_world_size_one_needs_no_peers() -> None:
    g = FastGroup.create(dist.HashStore(), 0, 1)
    t = torch.arange(4.0)
    assert g.all_reduce(t) is t and torch.equal(t, torch.arange(4.0))
    assert g.broadcast_bytes(b"abc") == b"abc"
    assert torch.equal(g.all_gather(t), t[None])
    g.barrier()
    g.close()
    g.close()
    with pytest.raises(CommError, match="closed"):
        g.all_reduce(t)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(CommError, match="transport 'udp'"):
        FastGroup.create(dist.HashStore(), 0, 2, transport="udp")
    with pytest.raises(CommError, match="rank 2 is outside world size 2"):
        FastGroup.create(dist.HashStore(), 2, 2)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_eight_ranks_in_threads(transport: str) -> None:
    """World size 8 (index arithmetic, 8-way mesh), with threads of this process for ranks: the GIL makes it
    slow, so few rounds."""
    world, rounds = 8, 3
    store = _master_store()
    results: dict[int, list[torch.Tensor]] = {}
    failures: list[str] = []

    def rank_main(rank: int) -> None:
        try:
            client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=30))
            with FastGroup.create(client, rank, world, transport=transport, timeout=20, spin_us=0) as g:
                outs = []
                for i in range(rounds):
                    x = _inputs(i, 640, torch.float32, world)[rank]
                    outs.append(g.all_reduce(x).clone())
                outs.append(g.all_gather(torch.tensor([rank])).view(-1))
                outs.append(torch.tensor(list(g.broadcast_bytes(b"\x07" * 9 if rank == 5 else None, src=5))))
                results[rank] = outs
        except BaseException:
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ANSWER_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    assert failures == []
    for i in range(rounds):
        xs = _inputs(i, 640, torch.float32, world)
        expected = xs[0].clone()
        for x in xs[1:]:
            expected += x
        assert all(torch.equal(results[r][i], expected) for r in range(world))
    assert all(results[r][rounds].tolist() == list(range(world)) for r in range(world))
    assert all(results[r][rounds + 1].tolist() == [7] * 9 for r in range(world))


# Last: it ends worker 2's process (the next user of the cluster would restart it).
def test_a_rank_that_exits_makes_the_others_fail_at_once(cluster: Cluster) -> None:
    res = cluster.run(_early_exit, 3, exits=frozenset({2}), name=_name())
    for r in res[:2]:
        # Shared memory looks up the awaited peer's process while it sleeps: gone (or a zombie), it
        # raises naming the rank and its process, long before the 2 s timeout.
        for label in ("shm", "native") if native.available() else ("shm",):
            msg, waited = r[label]
            assert "rank 2 (process" in msg and "exited" in msg and "(the timeout)" not in msg, (label, msg)
            assert waited < 1.0, (label, waited)
        # TCP sees the closed connection: it raises on that, not on its timeout.
        tcp_msg, _ = r["tcp"]
        assert "rank 2" in tcp_msg and "(the timeout)" not in tcp_msg, tcp_msg
        assert r["mapped_after_close"] == []
