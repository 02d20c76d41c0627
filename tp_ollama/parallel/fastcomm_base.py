"""What FastGroup (tp_ollama.parallel.fastcomm) and its transports (fastcomm_shm, fastcomm_tcp) share: the
error, the op codes written next to every message, the transport protocol and the c10d store helper.

The transports import this module, never the dispatcher, so FastGroup can import them at the top.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from tp_ollama.errors import TpOllamaError


class CommError(TpOllamaError):
    """A collective that cannot complete: a peer died, timed out, or called a different collective."""


# Op codes written next to every message so that ranks calling collectives in different orders fail loudly
# instead of silently summing the wrong bytes.
OPS = {"all_reduce": 1, "broadcast": 2, "all_gather": 3, "broadcast_bytes": 4, "barrier": 5}
OP_NAMES = {code: name for name, code in OPS.items()}


def op_name(code: int) -> str:
    return OP_NAMES.get(code, f"op {code}")


def too_big_message(src: int, n: int, max_bytes: int) -> str:
    return (
        f"broadcast_bytes: rank {src} sends {n} bytes, more than max_bytes={max_bytes}, and no torch.distributed "
        "process group is initialised to fall back on"
    )


def sum_in_rank_order(views: list[torch.Tensor], out: torch.Tensor) -> None:
    """out = ((v0 + v1) + v2) + ...: one fixed association, so every rank gets the same bits."""
    torch.add(views[0], views[1], out=out)
    for v in views[2:]:
        out.add_(v)


class ViewCache:
    """Typed 1-D views of fixed byte buffers, made once per (buffer set, dtype, numel): creating tensor views
    costs about a microsecond each, which matters at tens of µs per collective."""

    def __init__(self, buffer_sets: list[list[torch.Tensor]], limit: int = 64) -> None:
        self._sets = buffer_sets  # each a list of uint8 tensors, one per rank, payload-aligned
        self._limit = limit  # prefill makes a new numel per prompt length; keep the cache bounded
        self._views: dict[tuple[int, torch.dtype, int], list[torch.Tensor]] = {}

    def get(self, which: int, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        key = (which, dtype, numel)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= self._limit:
                self._views.pop(next(iter(self._views)))
            nbytes = numel * dtype.itemsize
            views = [buf[:nbytes].view(dtype) for buf in self._sets[which]]
            self._views[key] = views
        return views

    def clear(self) -> None:
        self._views.clear()
        self._sets = []


class Transport(Protocol):
    """What FastGroup needs from a transport. Tensors are 1-D, contiguous, CPU and at most max_bytes."""

    name: str

    def all_reduce(self, flat: torch.Tensor) -> None: ...

    def broadcast(self, flat: torch.Tensor, src: int) -> None: ...

    def all_gather(self, flat: torch.Tensor) -> torch.Tensor: ...  # (world_size, numel)

    def broadcast_bytes(self, data: bytes | None, src: int, big_ok: bool) -> bytes | int:
        """The bytes, or (on every rank) the length src announced when it is over max_bytes and big_ok was
        true at src: the caller then moves them. Over max_bytes without big_ok: CommError on every rank."""
        ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


def host_id() -> str:
    """hostname + kernel boot id. Ranks that agree on both run on one machine; whether they also share
    /dev/shm (containers may not) is found out when they try to map the segment."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def store_get_all(store: dist.Store, keys: list[str], timeout: float, what: str, rank: int) -> list[bytes]:
    """Wait for every key (at most `timeout` s), then read them. Each key ends in the rank that sets it."""
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except (RuntimeError, dist.DistError) as e:
        missing = [k.rsplit("/", 1)[-1] for k in keys if not store.check([k])]
        raise CommError(
            f"fastcomm setup: rank {rank} waited {timeout:g} s for {what} from rank(s) {', '.join(missing)}: {e}"
        ) from e
    return [store.get(k) for k in keys]
