"""Communicators for the tensor-parallel group: torch.distributed (gloo / nccl) and the
latency-optimised FastGroup for the small decode collectives. Chosen by name, counted per op."""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tp_ollama.errors import ConfigError


class Comm(Protocol):
    """The collectives a shard needs (tp_ollama.parallel.comm implements them)."""

    rank: int
    world_size: int

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes: ...


COMM_KINDS = ("auto", "shm", "tcp", "gloo", "nccl")


class SoloComm:
    """The communicator of a group of one: every collective is the identity."""

    rank, world_size, seconds = 0, 1, 0.0

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t[None]

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        assert data is not None
        return data

    def close(self) -> None:
        pass


class TorchComm:
    """Collectives through a torch.distributed process group: the default one, or `group` (ranks
    and sources are then the group's own)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.transport = dist.get_backend(group)
        self.stats: Counter[str] = Counter()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.stats["all_reduce"] += 1
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.stats["all_gather"] += 1
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.stats["broadcast"] += 1
        dist.broadcast(t, group=self.group, group_src=src)
        return t

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Its length, then its bytes, as tensors (no pickle crosses the network)."""
        self.stats["broadcast_bytes"] += 1
        device = "cuda" if self.transport == "nccl" else "cpu"
        mine = self.rank == src
        size = torch.tensor([len(data) if mine and data is not None else 0], dtype=torch.int64, device=device)
        dist.broadcast(size, group=self.group, group_src=src)
        n = int(size.item())
        if mine:
            assert data is not None
            buf = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
                if n
                else torch.empty(0, dtype=torch.uint8)
            )
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=device)
        if n:
            dist.broadcast(buf, group=self.group, group_src=src)
        return bytes(buf.cpu().numpy().tobytes())

    def close(self) -> None:
        pass


class HostStaged:
    """Lets a host-memory communicator (FastGroup, gloo) serve tensors on an accelerator by staging
    them through CPU memory: for ranks that share one GPU, where NCCL refuses to run."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.stats = inner.stats

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return self.inner.all_reduce(t)
        return t.copy_(self.inner.all_reduce(t.cpu()))

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.inner.all_gather(t.cpu()).to(t.device)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if t.device.type == "cpu":
            return self.inner.broadcast(t, src)
        return t.copy_(self.inner.broadcast(t.cpu(), src))

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        return bytes(self.inner.broadcast_bytes(data, src))

    def close(self) -> None:
        self.inner.close()


class Timed:
    """Any communicator, with the wall time spent inside its collectives added up in `seconds`
    (read per request: time in collectives per token, in the cluster metrics)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.stats = inner.stats
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:  # transport, and whatever else the inner one offers
        return getattr(self.inner, name)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.all_reduce(t)
        finally:
            self.seconds += time.perf_counter() - t0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.all_gather(t)
        finally:
            self.seconds += time.perf_counter() - t0

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.broadcast(t, src)
        finally:
            self.seconds += time.perf_counter() - t0

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        t0 = time.perf_counter()
        try:
            return bytes(self.inner.broadcast_bytes(data, src))
        finally:
            self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.inner.close()


def init_distributed(backend: str, timeout_s: float) -> None:
    """Join the process group torchrun described in the environment."""
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def join_group(kind: str, timeout_s: float) -> Any:
    """Join the process group torchrun described in the environment, give this rank its share of its
    host's cores, and build the communicator of `kind`.

    Which ranks share a host is found out here, at rendezvous, from every rank's host identity, not
    from the launcher's LOCAL_WORLD_SIZE: two `launch` nodes started on one machine are one host
    with two ranks, whatever command started them, and each rank gets half its cores (busy OpenMP
    threads beyond the cores spin against each other). OMP_NUM_THREADS, when set, wins."""
    init_distributed("nccl" if kind == "nccl" else "gloo", timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(threads_for(ranks_on_my_host(rank, world, timeout_s)))
    return make_comm(kind, timeout_s)


def ranks_on_my_host(rank: int, world: int, timeout_s: float) -> int:
    """How many ranks of the group (this one included) run on this rank's machine."""
    from tp_ollama.parallel.fastcomm_base import host_id, store_get_all

    store = dist.distributed_c10d._get_default_store()
    me = host_id()
    store.set(f"tpo/host/{rank}", me)
    hosts = store_get_all(store, [f"tpo/host/{r}" for r in range(world)], timeout_s, "host identities", rank)
    return sum(h.decode() == me for h in hosts)


def threads_for(ranks_on_host: int) -> int:
    """This rank's OpenMP threads: OMP_NUM_THREADS when set, else an equal share of the CPUs this
    process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, ranks_on_host))


def check_comm_kind(kind: str) -> None:
    if kind not in COMM_KINDS:
        raise ConfigError(f"communicator {kind!r} is not supported; supported: {', '.join(COMM_KINDS)}")


def stage_group(comm: Any, kind: str, tp: int, timeout_s: float) -> Any:
    """The tensor-parallel communicator among the `tp` ranks of this rank's pipeline stage (ranks
    stage x tp .. stage x tp + tp - 1 of `comm`'s group): every rank of the group calls this together.
    The hand-overs between stages and the ticks stay on `comm`."""
    if tp == 1:
        return SoloComm()
    check_comm_kind(kind)
    rank, world = comm.rank, comm.world_size
    stage = rank // tp
    if kind in ("gloo", "nccl"):
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(world // tp)]  # every rank, in order
        inner = TorchComm(groups[stage])
        return Timed(inner if kind == "nccl" else HostStaged(inner))
    from tp_ollama.parallel.fastcomm import FastGroup

    store = dist.distributed_c10d._get_default_store()
    group = FastGroup.create(store, rank % tp, tp, transport=kind, timeout=timeout_s, name=f"stage{stage}")
    return Timed(group)


def make_comm(kind: str, timeout_s: float) -> Any:
    """`auto` and `shm`/`tcp` use FastGroup (shared memory on one host, sockets across hosts),
    bootstrapped from the process group's store; `gloo`/`nccl` use torch.distributed alone."""
    check_comm_kind(kind)
    if kind == "nccl":
        return Timed(TorchComm())
    if kind == "gloo":
        return Timed(HostStaged(TorchComm()))
    from tp_ollama.parallel.fastcomm import FastGroup

    store = dist.distributed_c10d._get_default_store()
    group = FastGroup.create(store, dist.get_rank(), dist.get_world_size(), transport=kind, timeout=timeout_s)
    return Timed(group)
