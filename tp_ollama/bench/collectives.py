"""`tp-ollama bench collectives`: latency and bandwidth of the collectives decode makes, per backend
(fastcomm `shm`, fastcomm `tcp`, torch.distributed `gloo`), operation and message size, between real
ranks started by tp_ollama.launch.run_workers, so the same command measures one host or several.

Ranks: `world` is the number of ranks on each node (torchrun's nproc_per_node); the group holds
world x nnodes ranks. Every node runs the same call with its own `node_rank`; node 0 hosts the
rendezvous and returns the report, the others return None.

all_reduce: SUM of `bytes / 4` float32 in place. broadcast: `bytes` uint8 from rank 0. Latency is one
call's wall time on rank 0, calls back to back after a barrier (back-to-back broadcasts pipeline, so
theirs is the cost per call, not a one-way latency); every rank's p50 is kept in `extra`.
bandwidth_gbs is the algorithmic bandwidth, bytes / p50 latency: the message size over the time one
call takes, not the bytes on the wire (a ring all-reduce moves about twice the message per rank).
fastcomm groups get max_bytes large enough for every size, so no size silently falls back to gloo.
`shm` needs every rank on one host: across hosts fastcomm refuses it and the backend is skipped with
a note.

The report's `link` comes from measure_link (tp_ollama.parallel.preflight, which the launcher's
pre-flight check runs too) on `tcp` when the ranks span hosts and tcp is measured, else on the first
backend that opened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tp_ollama.errors import ConfigError

BACKENDS = ("shm", "tcp", "gloo")
OPS = ("all_reduce", "broadcast")
WARMUP = 5
# Without a fixed iteration count each (backend, op, size) runs for about this long, within these bounds.
CELL_BUDGET_S = 0.25
MIN_ITERS, MAX_ITERS = 20, 2000
LINK_BENCH_BUDGET_S = 1.0  # a bench can spend a second on measure_link: many calls, a steady median
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CollectivesJob:
    """What every rank runs (passed through the launcher: must pickle)."""

    backends: tuple[str, ...]
    sizes: tuple[int, ...]
    iters: int | None
    max_bytes: int
    timeout_s: float
    progress: bool


# ---- the link as an emulation configured it ------------------------------------------------------


def configured_link(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What an emulated link was set to (launch/netns-cluster.sh exports it), to show beside what was
    measured: the delay the TCP transport adds, the tbf rate."""
    configured: dict[str, Any] = {}
    if environ.get("TP_OLLAMA_LINK_DELAY_US", "").strip():
        configured["delay_us"] = environ["TP_OLLAMA_LINK_DELAY_US"].strip()
    if environ.get("TP_OLLAMA_LINK_RATE", "").strip():
        configured["rate"] = environ["TP_OLLAMA_LINK_RATE"].strip()
    return configured


# ---- inside every rank --------------------------------------------------------------------------


def _open(backend: str, max_bytes: int, timeout_s: float) -> tuple[Any, str | None]:
    """(communicator, None), or (None, why) for a shm group fastcomm refuses (ranks on several hosts,
    no usable /dev/shm). Every rank reaches the same verdict: fastcomm decides from what all ranks posted."""
    import torch.distributed as dist

    from tp_ollama.parallel.comm import TorchComm
    from tp_ollama.parallel.fastcomm import FastGroup
    from tp_ollama.parallel.fastcomm_base import CommError

    if backend == "gloo":
        return TorchComm(), None
    store = dist.distributed_c10d._get_default_store()
    try:
        group = FastGroup.create(
            store,
            dist.get_rank(),
            dist.get_world_size(),
            transport=backend,
            max_bytes=max_bytes,
            timeout=timeout_s,
            name="bench",
        )
    except CommError as e:
        if backend != "shm":
            raise
        return None, f"shm skipped: {e}"
    return group, None


def _timed(call: Any) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _agree_iters(seconds_per_call: float) -> int:
    """Rank 0's iteration count for about CELL_BUDGET_S of calls, on every rank."""
    import torch
    import torch.distributed as dist

    n = MAX_ITERS if seconds_per_call <= 0 else int(CELL_BUDGET_S / seconds_per_call)
    count = torch.tensor([max(MIN_ITERS, min(MAX_ITERS, n))], dtype=torch.int64)
    dist.broadcast(count, 0)
    return int(count[0])


def _measure(comm: Any, op: str, nbytes: int, iters: int | None) -> list[float]:
    """Seconds per call of `op` on `nbytes`, this rank's, back to back after a barrier."""
    import torch
    import torch.distributed as dist

    if op == "all_reduce":
        x = torch.zeros(nbytes // 4)  # (nbytes/4,) float32
        call = lambda: comm.all_reduce(x)  # noqa: E731
    else:
        x = torch.zeros(nbytes, dtype=torch.uint8)
        call = lambda: comm.broadcast(x, 0)  # noqa: E731
    warm = [_timed(call) for _ in range(WARMUP)]
    n = iters if iters is not None else _agree_iters(statistics.median(warm))
    dist.barrier()
    return [_timed(call) for _ in range(n)]


@contextlib.contextmanager
def _progress(total: int, show: bool) -> Iterator[Any]:
    if not show:
        yield None
        return
    from tp_ollama.bench import report

    with report.Progress(total, "collectives") as bar:
        yield bar


def rank_main(job: CollectivesJob) -> dict[str, Any] | None:
    """One rank's whole run; rank 0 returns the rows, the link and the notes, the others None."""
    import torch
    import torch.distributed as dist

    from tp_ollama.parallel.comm import init_distributed
    from tp_ollama.parallel.preflight import measure_link

    torch.set_num_threads(1)  # ranks share the host's cores; collectives are not what threads speed up
    init_distributed("gloo", job.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    crosses = len(set(hosts)) > 1
    link_backend = "tcp" if crosses and "tcp" in job.backends else None
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    link: dict[str, Any] | None = None
    with _progress(len(job.backends) * len(OPS) * len(job.sizes), job.progress and rank == 0) as bar:
        for backend in job.backends:
            comm, why = _open(backend, job.max_bytes, job.timeout_s)
            if comm is None:
                notes.append(why or f"{backend} skipped")
                if bar is not None:
                    for _ in range(len(OPS) * len(job.sizes)):
                        bar.advance(f"{backend}: skipped")
                continue
            try:
                for op in OPS:
                    for nbytes in job.sizes:
                        times = _measure(comm, op, nbytes, job.iters)
                        rows.append({"backend": backend, "op": op, "bytes": nbytes, "times_s": times})
                        if bar is not None:
                            bar.advance(f"{backend} {op} {nbytes} B")
                if link is None and (link_backend or backend) == backend:
                    link = measure_link(comm, budget_s=LINK_BENCH_BUDGET_S)
            finally:
                comm.close()
    medians = [statistics.median(r["times_s"]) for r in rows]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, medians)
    dist.destroy_process_group()
    if rank != 0:
        return None
    for i, row in enumerate(rows):
        row["rank_p50_us"] = [m[i] * 1e6 for m in every]
    return {"rows": rows, "link": link, "notes": notes, "hosts": sorted(set(hosts))}


# ---- the whole run ------------------------------------------------------------------------------


def _check(backends: Sequence[str], sizes: Sequence[int], world: int, nnodes: int, iters: int | None) -> None:
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise ConfigError(f"backends {list(backends)} are invalid: expected one or more of {', '.join(BACKENDS)}")
    if len(set(backends)) != len(backends):
        raise ConfigError(f"backends {list(backends)} repeat a backend: expected each at most once")
    bad = [s for s in sizes if s < 4 or s % 4]
    if not sizes or bad:
        raise ConfigError(f"message sizes {bad or list(sizes)} are invalid: expected byte counts, multiples of 4, >= 4")
    if world < 1 or nnodes < 1 or world * nnodes < 2:
        raise ConfigError(f"{world} rank(s) per node on {nnodes} node(s) is invalid: expected at least 2 ranks in all")
    if iters is not None and iters < 1:
        raise ConfigError(f"iters {iters} is invalid: expected at least 1 (or none: bounded by time)")


def run_collectives(
    backends: list[str],
    sizes: list[int],
    world: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 0,
    iters: int | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Every (backend, op, size) between world x nnodes ranks, `world` on this node: the report of kind
    "collectives" on node 0, None on the others. `iters`: timed calls per cell (default: ~0.25 s each)."""
    from tp_ollama.bench import report
    from tp_ollama.launch import Cluster, run_workers

    _check(backends, sizes, world, nnodes, iters)
    cluster = Cluster(
        nnodes=nnodes, node_rank=node_rank, nproc_per_node=world, master_addr=master_addr, master_port=master_port
    )
    job = CollectivesJob(tuple(backends), tuple(sizes), iters, max(1 << 20, max(sizes)), TIMEOUT_S, progress)
    settings = {
        "backends": list(backends),
        "sizes": list(sizes),
        "nproc_per_node": world,
        "nnodes": nnodes,
        "ranks": cluster.world_size,
        "iters": iters,
        "max_bytes": job.max_bytes,
    }
    out = report.new_report("collectives", settings, argv)  # dated at the start, like the other kinds
    ranks = run_workers(cluster, rank_main, job)
    if node_rank != 0:
        return None
    got = ranks[0]
    for row in got["rows"]:
        times = row["times_s"]
        latency = report.summarize([t * 1e6 for t in times])
        p50 = statistics.median(times)
        config = {"op": row["op"], "bytes": row["bytes"], "ranks": cluster.world_size, "nodes": nnodes}
        extra = {"iters": len(times), "rank_p50_us": row["rank_p50_us"]}
        report.add_result(
            out, row["backend"], config, latency_us=latency, bandwidth_gbs=row["bytes"] / p50 / 1e9, extra=extra
        )
    if got["link"] is not None:
        out["link"] = {**got["link"], "configured": configured_link()}
    out["notes"].extend(got["notes"])
    out["notes"].append(
        f"latency: rank 0's wall time per call, back to back, {cluster.world_size} ranks on "
        f"{len(got['hosts'])} host(s); "
        "bandwidth_gbs is algorithmic: message bytes / p50 latency"
    )
    return out
