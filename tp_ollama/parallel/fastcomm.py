"""Low-latency collectives for tiny tensors between the ranks of one tensor-parallel group.

Decode of a small model does two all-reduces of a few KB per layer per token. Gloo's fixed cost per
all-reduce (~840 µs between two local processes on the CI machine) is larger than the layer's compute, so
this module moves those bytes itself: through one POSIX shared-memory segment when every rank runs on the
same host ("shm", tens of µs), else over a full mesh of persistent TCP sockets ("tcp").

Everything is set up through the c10d store torchrun / init_process_group already created. Every wait has a
timeout and raises CommError naming the op and the ranks waited for, so a dead peer never hangs anyone.

Reductions sum in rank order 0..N-1 on every rank, so the result is bit-identical across ranks (and equal to
`x0 + x1 + ...` computed in the tensor's own dtype). Tensors larger than `max_bytes`, of a dtype the fast
path does not reduce, or not on the CPU go through torch.distributed's own collectives when a default
process group of the same ranks is initialised (gloo on CPU, nccl on GPU); without one (a sub-group: a
pipeline stage's ranks) a large contiguous CPU all-reduce or broadcast goes through in pieces of
max_bytes, and anything else raises CommError.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tp_ollama.parallel.fastcomm_base import OPS, CommError, Transport, host_id, store_get_all
from tp_ollama.parallel.fastcomm_shm import ShmTransport
from tp_ollama.parallel.fastcomm_tcp import TcpTransport

REDUCE_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64})
TRANSPORTS = ("auto", "shm", "tcp")
# More ranks on a host than CPUs: a spinning rank only holds the core its peer needs (3 ranks on 2 cores:
# ~120 µs per all-reduce spinning 2 µs, ~265 µs spinning 50 µs), so spin at most this long.
OVERSUBSCRIBED_SPIN_S = 2e-6


def _shm_capable() -> bool:
    # The shm protocol relies on x86-64's total store order (see fastcomm_shm); elsewhere auto picks tcp.
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _dist_ready(world_size: int, rank: int) -> bool:
    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
        and dist.get_rank() == rank
    )


class FastGroup:
    """One tensor-parallel group's collectives. Every rank must call the same collectives in the same order,
    with tensors of the same shape and dtype (as with torch.distributed)."""

    def __init__(self, rank: int, world_size: int, transport: str, impl: Transport | None, max_bytes: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.transport = transport
        self.max_bytes = max_bytes
        self.stats: dict[str, int] = dict.fromkeys(OPS, 0)
        self._impl = impl
        self._closed = False

    @classmethod
    def create(
        cls,
        store: dist.Store,
        rank: int,
        world_size: int,
        *,
        transport: str = "auto",
        max_bytes: int = 1 << 20,
        timeout: float = 60.0,
        spin_us: float = 50.0,
        name: str = "default",
    ) -> FastGroup:
        """Collective over all ranks: every rank calls it with the same arguments (rank aside).

        transport: "shm" (all ranks on one x86-64 host), "tcp", or "auto" (shm when possible, else tcp).
        max_bytes: the largest tensor or byte string the fast path carries (larger: see the module docstring).
        timeout: seconds any one wait may take before CommError, setup included.
        spin_us: how long a waiting rank busy-polls before yielding its core (at most 2 µs when this host
            runs more of the group's ranks than it has CPUs).
        Groups are told apart on the store by `name` and by how many groups of that name this rank has
        already joined, so ranks must create groups of one name in the same order (like new_group)."""
        if transport not in TRANSPORTS:
            raise CommError(f"fastcomm transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        if not 0 <= rank < world_size:
            raise CommError(f"fastcomm rank {rank} is outside world size {world_size}")
        if max_bytes < 64 or timeout <= 0 or spin_us < 0:
            got = f"max_bytes={max_bytes}, timeout={timeout}, spin_us={spin_us}"
            raise CommError(f"fastcomm needs max_bytes >= 64, timeout > 0 and spin_us >= 0 (got {got})")
        if world_size == 1:
            return cls(rank, 1, "tcp" if transport == "tcp" else "shm", None, max_bytes)
        joined = store.add(f"fastcomm/{name}/w{world_size}/joined/{rank}", 1)
        prefix = f"fastcomm/{name}/w{world_size}/{joined}/"
        impl = _bootstrap(store, prefix, rank, world_size, transport, max_bytes, timeout, spin_us * 1e-6)
        return cls(rank, world_size, impl.name, impl, max_bytes)

    def __enter__(self) -> FastGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FastGroup(rank={self.rank}, world_size={self.world_size}, transport={self.transport!r})"

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place on t, in rank order; returns t."""
        self.stats["all_reduce"] += 1
        impl = self._live()
        if impl is None:
            return t
        if self._chunked(t, t.dtype in REDUCE_DTYPES):
            flat = t.view(-1)
            step = self.max_bytes // t.element_size()
            for i in range(0, flat.numel(), step):
                impl.all_reduce(flat[i : i + step])
        elif t.device.type != "cpu" or t.dtype not in REDUCE_DTYPES or t.nbytes > self.max_bytes:
            self._fallback("all_reduce", t, lambda x: dist.all_reduce(x))
        elif t.is_contiguous():
            impl.all_reduce(t.view(-1))
        else:
            c = t.contiguous()
            impl.all_reduce(c.view(-1))
            t.copy_(c)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy src's t into every rank's t (same shape and dtype everywhere); returns t."""
        self.stats["broadcast"] += 1
        self._check_src(src)
        impl = self._live()
        if impl is None:
            return t
        if self._chunked(t, True):
            raw = _as_bytes(t)
            for i in range(0, raw.numel(), self.max_bytes):
                impl.broadcast(raw[i : i + self.max_bytes], src)
        elif t.device.type != "cpu" or t.nbytes > self.max_bytes:
            self._fallback("broadcast", t, lambda x: dist.broadcast(x, src))
        elif t.is_contiguous():
            impl.broadcast(_as_bytes(t), src)
        else:
            c = t.contiguous()
            impl.broadcast(_as_bytes(c), src)
            t.copy_(c)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t stacked in rank order: a new (world_size, *t.shape) tensor."""
        self.stats["all_gather"] += 1
        impl = self._live()
        if impl is None:
            return t.unsqueeze(0).clone()
        if t.device.type != "cpu" or t.nbytes > self.max_bytes:
            self._fallback_ready("all_gather", t)
            mine = t.to(_group_device()).contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine)
            return torch.stack(parts).to(t.device)
        rows = impl.all_gather(_as_bytes(t.contiguous()))  # (world_size, nbytes) uint8
        return rows.view(t.dtype).view(self.world_size, *t.shape)

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """src's `data` (any length) on every rank; other ranks pass None. Up to max_bytes on the fast path,
        longer through torch.distributed when a process group is initialised."""
        self.stats["broadcast_bytes"] += 1
        self._check_src(src)
        if self.rank == src and data is None:
            raise ValueError(f"broadcast_bytes: rank {src} is the source and must pass bytes, not None")
        impl = self._live()
        if impl is None:
            assert data is not None
            return bytes(data)
        big_ok = data is not None and len(data) > self.max_bytes and _dist_ready(self.world_size, self.rank)
        got = impl.broadcast_bytes(data, src, big_ok)
        if isinstance(got, bytes):
            return got
        # The source announced `got` bytes, more than max_bytes: move them with torch.distributed.
        self.stats["fallback_broadcast_bytes"] = self.stats.get("fallback_broadcast_bytes", 0) + 1
        if data is not None:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(got, dtype=torch.uint8)
        moved = buf.to(_group_device())
        dist.broadcast(moved, src)
        return moved.cpu().numpy().tobytes()

    def barrier(self) -> None:
        self.stats["barrier"] += 1
        impl = self._live()
        if impl is not None:
            impl.barrier()

    def close(self) -> None:
        """Release sockets and shared memory. Idempotent; not collective."""
        if self._closed:
            return
        self._closed = True
        if self._impl is not None:
            self._impl.close()
            self._impl = None

    def native_all_reduce(self) -> Any:
        """The shared-memory transport's all-reduce as a C function for a native decode step
        (fastcomm_shm.NativeAllReduce), or None: another transport, or no native kernels here."""
        native = getattr(self._impl, "native_all_reduce", None) if not self._closed else None
        return native() if native is not None else None

    def _live(self) -> Transport | None:
        if self._closed:
            raise CommError(f"fastcomm group (rank {self.rank}) is closed")
        return self._impl

    def _chunked(self, t: torch.Tensor, fast_dtype: bool) -> bool:
        """A contiguous CPU tensor larger than max_bytes that no process group of these ranks can
        take (a sub-group: a pipeline stage's tensor-parallel ranks) goes through in pieces."""
        big = t.nbytes > self.max_bytes and t.device.type == "cpu" and t.is_contiguous() and fast_dtype
        return big and not _dist_ready(self.world_size, self.rank)

    def _check_src(self, src: int) -> None:
        if not 0 <= src < self.world_size:
            raise CommError(f"fastcomm source rank {src} is outside world size {self.world_size}")

    def _fallback_ready(self, op: str, t: torch.Tensor) -> None:
        if not _dist_ready(self.world_size, self.rank):
            raise CommError(
                f"{op} of a {t.dtype} tensor on {t.device} with {t.nbytes} bytes cannot use fastcomm "
                f"(CPU, at most max_bytes={self.max_bytes}"
                + (", a reducible dtype" if op == "all_reduce" else "")
                + ") and no torch.distributed process group of the same ranks is initialised to fall back on"
            )
        key = f"fallback_{op}"
        self.stats[key] = self.stats.get(key, 0) + 1

    def _fallback(self, op: str, t: torch.Tensor, run: Callable[[torch.Tensor], object]) -> None:
        """Run a torch.distributed collective on t in place, on the device the default group's backend uses."""
        self._fallback_ready(op, t)
        dev = _group_device()
        if t.device == dev and t.is_contiguous():
            run(t)
        else:
            moved = t.to(dev).contiguous()
            run(moved)
            t.copy_(moved)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a 1-D uint8 view (works for every dtype, 0-dim included)."""
    return t.view(-1).view(torch.uint8)


def _group_device() -> torch.device:
    # nccl only moves CUDA tensors; every other backend here (gloo) takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bootstrap(
    store: dist.Store,
    prefix: str,
    rank: int,
    world_size: int,
    transport: str,
    max_bytes: int,
    timeout: float,
    spin_s: float,
) -> Transport:
    me = {"host": host_id(), "shm": _shm_capable(), "max_bytes": max_bytes, "transport": transport}
    store.set(f"{prefix}host/{rank}", json.dumps(me))
    keys = [f"{prefix}host/{p}" for p in range(world_size)]
    peers = [json.loads(v) for v in store_get_all(store, keys, timeout, "host records", rank)]
    for p, rec in enumerate(peers):
        if (rec["max_bytes"], rec["transport"]) != (max_bytes, transport):
            raise CommError(
                f"fastcomm ranks disagree: rank {p} asked for transport={rec['transport']!r} "
                f"max_bytes={rec['max_bytes']}, rank {rank} for transport={transport!r} max_bytes={max_bytes}"
            )
    one_host = all(rec["host"] == me["host"] and rec["shm"] for rec in peers)
    if sum(rec["host"] == me["host"] for rec in peers) > _cpus():
        spin_s = min(spin_s, OVERSUBSCRIBED_SPIN_S)
    if transport == "shm" and not one_host:
        hosts = ", ".join(f"rank {p}: {rec['host']} shm={rec['shm']}" for p, rec in enumerate(peers))
        raise CommError(f"fastcomm transport 'shm' needs every rank on one x86-64 host with /dev/shm ({hosts})")
    if transport != "tcp" and one_host:
        shm, reasons = ShmTransport.attach(store, prefix, rank, world_size, max_bytes, timeout, spin_s)
        if shm is not None:
            return shm
        if transport == "shm":
            raise CommError(f"fastcomm shared memory failed: {reasons}")
    token = int.from_bytes(hashlib.blake2b(prefix.encode(), digest_size=8).digest(), "little")
    return TcpTransport.connect(store, prefix, token, rank, world_size, max_bytes, timeout, spin_s)
