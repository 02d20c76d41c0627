"""Latency of the collectives decode makes, between local ranks: fastcomm over shared memory, fastcomm over
loopback TCP, and gloo through torch.distributed, in one run, every rank a fresh process.

    python bench/collectives.py                        # 2 and 3 ranks, writes bench/results/collectives.json
    python bench/collectives.py --worlds 2 --scale 0.2 --out /tmp/c.json

all_reduce: SUM of N float32 in place (640 floats is one Gemma 3 270M hidden state, done twice per layer per
token). broadcast_bytes: 64 bytes from rank 0 (a step description); gloo's entry is broadcast_object_list, which
is how torch.distributed moves bytes. Latency is one call's wall time on rank 0, calls back to back; the
per-rank medians are listed too. Every rank runs with one torch thread. Back-to-back broadcasts pipeline (the
source returns once its bytes are written, on shm once the receivers are at most a round behind), so their
figure is the cost per call, not a one-way latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

SIZES = [640, 2048, 16384, 262144]  # float32 elements
ITERS = {640: 2000, 2048: 2000, 16384: 1000, 262144: 200}
BYTES_ITERS = 2000
WARMUP = 50
IMPLS = ["shm", "tcp", "gloo"]


def summarize(lat_ns: list[int]) -> dict[str, float]:
    s = sorted(lat_ns)
    return {
        "median_us": statistics.median(s) / 1e3,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3,
        "mean_us": sum(s) / len(s) / 1e3,
    }


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, conn: Connection) -> None:
    import torch
    import torch.distributed as dist

    from tp_ollama.parallel.fastcomm import FastGroup

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("bench", store), rank=rank, world_size=world)
    default = dist.distributed_c10d._get_default_store()
    fast = [t for t in args.impls if t != "gloo"]
    groups = {t: FastGroup.create(default, rank, world, transport=t, timeout=60, spin_us=args.spin_us) for t in fast}
    assert all(g.transport == t for t, g in groups.items())
    rows: list[dict[str, Any]] = []

    def timed(impl: str, op: str, size: int, iters: int, call: Any) -> None:
        iters = max(20, int(iters * args.scale))
        for _ in range(WARMUP):
            call()
        dist.barrier()
        lat = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            call()
            lat.append(time.perf_counter_ns() - t0)
        rows.append({"world": world, "impl": impl, "op": op, "size": size, "iters": iters, **summarize(lat)})

    for impl in args.impls:
        g = groups.get(impl)
        for n in SIZES:
            x = torch.zeros(n)  # zeros stay zeros: summing in place must not drift into inf/denormals
            run = (lambda x=x: dist.all_reduce(x)) if g is None else (lambda x=x, g=g: g.all_reduce(x))
            timed(impl, "all_reduce", n, ITERS[n], run)
        msg = bytes(range(64)) if rank == 0 else None
        if g is None:
            run = lambda m=msg: dist.broadcast_object_list([m], 0)  # noqa: E731
        else:
            run = lambda m=msg, g=g: g.broadcast_bytes(m)  # noqa: E731
        timed(impl, "broadcast_bytes", 64, BYTES_ITERS, run)
    for g in groups.values():
        g.close()
    dist.destroy_process_group()
    conn.send(rows)


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import multiprocessing as mp

    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [ctx.Process(target=rank_main, args=(r, world, store.port, args, pipes[r][1])) for r in range(world)]
    for p in procs:
        p.start()
    per_rank: list[list[dict[str, Any]]] = []
    for r, (recv, _) in enumerate(pipes):
        if not recv.poll(600):
            for p in procs:
                p.kill()
            raise SystemExit(f"rank {r} of {world} gave no results within 600 s")
        per_rank.append(recv.recv())
    for p in procs:
        p.join(30)
    rows = per_rank[0]
    for i, row in enumerate(rows):
        row["rank_medians_us"] = [ranks[i]["median_us"] for ranks in per_rank]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts (at least 20 each)")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    ap.add_argument("--spin-us", type=float, default=50.0, help="FastGroup's spin_us")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "collectives.json"))
    args = ap.parse_args()

    import torch

    load = os.getloadavg()  # the 2-core CI machine is shared: a busy machine explains noisy tails
    results = []
    for world in args.worlds:
        for row in run_world(world, args):
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "mean_us"}), file=sys.stderr)
    report = {
        "benchmark": "collectives",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "load_average_at_start": load,
        "spin_us": args.spin_us,
        "notes": "latency of one call on rank 0, back-to-back calls; size = float32 elements or bytes",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
