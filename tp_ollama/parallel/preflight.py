"""The pre-flight check of a TP group that spans hosts: measure the link it actually has and this
host's read bandwidth, and warn when the cost model says one node alone would decode faster over it.

The two probes (measure_link, read_bandwidth_gbs) are also what the benchmarks measure with.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tp_ollama.checkpoints.quantize import describe_precision
from tp_ollama.errors import ConfigError
from tp_ollama.kernels import native
from tp_ollama.parallel.costmodel import Calibration, Link, Quant, predict, predict_pipeline, preflight_warning
from tp_ollama.parallel.shapes import shape_of

# Without a TP=1 measurement of this model the share of the read bandwidth decode achieves is a guess:
# about half is what the engine reaches on CPUs (bench/results/quant_decode.json, tp.json).
DEFAULT_EFFICIENCY = 0.5
PROBE_BYTES = 128 << 20  # a read bandwidth probe beyond the caches, a few tens of milliseconds
# measure_link's whole measurement, warm-up included, on any link fast enough for one pair of calls.
LINK_BUDGET_S = 0.1
MAX_LINK_ITERS = 50
READ_BYTES = 1 << 30  # 1 GiB: far beyond any cache, so the figure is DRAM's
TRIES = 5


def spans_hosts() -> bool:
    """torchrun's environment: more ranks in the group than on this node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def model_packings(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Each packed weight of a loaded model by module path, (int8 or int4, inputs per scale): the cost
    model's Packings (weights not named are float)."""
    from tp_ollama.kernels.linear import QuantEmbedding, QuantLinear

    return {
        path: (m.kind, m.group)
        for path, m in model.named_modules()
        if isinstance(m, QuantLinear | QuantEmbedding) and not path.endswith(".fused")
    }


def link_preflight(comm: Any, model: nn.Module, measured: dict[str, Any] | None = None) -> str | None:
    """Run on every rank of the group (the link measurement is collective; `measured`: a link that
    measure_link already gave); rank 0 gets the warning line, or None when TP over this link is
    predicted at least as fast as one node."""
    if comm.world_size == 1 or not spans_hosts():
        return None
    if measured is None:
        measured = measure_link(comm)
    if comm.rank != 0:
        return None
    shape = shape_of(model.config)
    precision = describe_precision(model)
    quant, dtype = model_packings(model), precision["dtype"]
    calibration = Calibration(read_bandwidth_gbs(nbytes=PROBE_BYTES, tries=2) * 1e9, DEFAULT_EFFICIENCY,
                              cores=os.cpu_count())  # fmt: skip
    link = Link.from_us_gbs(measured["latency_us"], measured["bandwidth_gbs"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    one = predict(shape, 1, link, calibration, quant, dtype)
    group = predict(shape, comm.world_size, link, calibration, quant, dtype, ranks_per_host=local)
    return preflight_warning(one, group)


def choose_partitioning(
    comm: Any, config: Any, quant: Quant, dtype: str, memory_budget: int = 0, measured: dict[str, Any] | None = None
) -> tuple[int, str]:
    """`inference.partitioning.strategy: auto`, on every rank of a group before it loads: measure the
    link, predict decode over it as tensor parallel (every rank a share of every layer), as layer-wise
    stages (a stage per rank) and, where hosts run several ranks each, as hybrid (a stage per host, TP
    among its ranks) with the cost model, and take the fastest. Returns (pipeline stages: 1 for
    tensor, the world size for layer-wise, the host count for hybrid; the line saying why, on rank 0).
    Collective: rank 0 decides for all. With a `memory_budget` (weight bytes per rank), only a split
    whose biggest part fits is taken (the fastest of those that do). `measured`: the link as
    measure_link found it, when the caller measured it already."""
    from tp_ollama.parallel.costmodel import Prediction

    world = comm.world_size
    measured = measured if measured is not None else measure_link(comm)
    decision = torch.zeros(1, dtype=torch.int64)
    line = ""
    if comm.rank == 0:
        shape = shape_of(config)
        calibration = Calibration(read_bandwidth_gbs(nbytes=PROBE_BYTES, tries=2) * 1e9, DEFAULT_EFFICIENCY,
                                  cores=os.cpu_count())  # fmt: skip
        link = Link.from_us_gbs(measured["latency_us"], measured["bandwidth_gbs"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        options: dict[str, Prediction] = {}
        try:
            options["tensor"] = predict(shape, world, link, calibration, quant, dtype, ranks_per_host=local)
        except ConfigError:  # more ranks than heads
            pass
        try:
            options["layerwise"] = predict_pipeline(shape, world, link, calibration, quant, dtype,
                                                    by_work=not memory_budget)  # fmt: skip
        except ConfigError:  # more ranks than layers
            pass
        hosts = world // local if world % local == 0 else 1
        if 1 < hosts < world:
            try:
                options["hybrid"] = predict_pipeline(shape, hosts, link, calibration, quant, dtype, tp=local,
                                                     by_work=not memory_budget)  # fmt: skip
            except ConfigError:
                pass
        if not options:
            raise ConfigError(f"{world} ranks can split this model neither by heads nor by layers")
        fits = {
            k: p
            for k, p in options.items()
            if not memory_budget or max(r.weight_bytes for r in p.ranks) <= memory_budget
        }
        best = max(fits or options, key=lambda k: options[k].tok_s)
        decision.fill_({"tensor": 1, "layerwise": world, "hybrid": hosts}[best])
        one = predict(shape, 1, link, calibration, quant, dtype)
        others = ", ".join(f"{k} {p.tok_s:.1f}" for k, p in options.items() if k != best)
        stages = f" ({hosts} stages of {local})" if best == "hybrid" else ""
        line = (
            f"partitioning auto: {best} over {world} ranks{stages}, predicted {options[best].tok_s:.1f} tok/s "
            f"({others}{', ' if others else ''}one node {one.tok_s:.1f}) over a link of {link.describe()}"
        )
    return int(comm.broadcast(decision, 0)[0]), line


SAME_SPEED = 0.15  # stages whose measured speeds differ by less than this share the work evenly


def measure_stage_weights(comm: Any, stages: int) -> tuple[float, ...] | None:
    """Stage weights for `--pp` without `--pp-weights`, measured on every rank of a group before it
    loads: each rank's read bandwidth with its own threads (what a decode step is bound by), a stage's
    the sum of its ranks'. None (equal stages) when the group runs on one host, whose ranks share one
    memory bus, or when the stages measure within SAME_SPEED of each other. Collective."""
    from tp_ollama.parallel.fastcomm_base import host_id

    mine = int.from_bytes(hashlib.blake2b(host_id().encode(), digest_size=7).digest(), "little")
    hosts = comm.all_gather(torch.tensor([mine], dtype=torch.int64)).reshape(-1).tolist()
    if len(set(hosts)) == 1:
        return None
    gbs = read_bandwidth_gbs(threads=torch.get_num_threads(), nbytes=PROBE_BYTES, tries=2)
    speeds = comm.all_gather(torch.tensor([gbs], dtype=torch.float64)).reshape(-1).tolist()
    return stage_weights(speeds, stages)


def stage_weights(speeds: list[float], stages: int) -> tuple[float, ...] | None:
    """Per-stage weights from each rank's measured speed (ranks in stage order, world / stages each),
    rounded to tenths of the fastest; None when they are within SAME_SPEED of each other."""
    tp = len(speeds) // stages
    per_stage = [sum(speeds[s * tp : (s + 1) * tp]) for s in range(stages)]
    fastest = max(per_stage)
    if min(per_stage) >= (1 - SAME_SPEED) * fastest:
        return None
    return tuple(max(0.1, round(x / fastest, 1)) for x in per_stage)


def _timed(call: Any) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def measure_link(
    comm: Any,
    small_bytes: int = 64,
    large_bytes: int = 1 << 20,
    iters: int | None = None,
    budget_s: float = LINK_BUDGET_S,
    device: str = "cpu",
) -> dict[str, Any]:
    """Collective over `comm`'s ranks (anything with all_reduce and broadcast: a FastGroup, a
    tp_ollama.parallel.comm communicator; tensors live on `device`, "cuda" for an nccl group).

    latency_us: p50 all-reduce time of `small_bytes`. bandwidth_gbs: (large - small) / (t_large - t_small)
    / 1e9 from the two p50s, so the fixed cost per call cancels. Without `iters`, rank 0 picks how many
    pairs of calls fit in `budget_s` from a warm-up pair (after an untimed one) and tells the others
    (ranks must run the same count); at least one pair is timed. Times are this rank's."""
    if not 4 <= small_bytes < large_bytes:
        raise ConfigError(f"measure_link sizes {small_bytes}, {large_bytes} are invalid: expected 4 <= small < large")
    small = torch.zeros(small_bytes // 4, device=device)  # zeros stay zeros: summing must not drift into inf
    large = torch.zeros(large_bytes // 4, device=device)
    # Large first: a rank leaves a large all-reduce before its peers have finished reading it, and the
    # next call waits for them, so a small call right after a large one would time the peers' lag.
    # The first pair also waits for the slowest rank to arrive and opens the connections: untimed. The
    # second says what a pair costs, for the count.
    comm.all_reduce(large)
    comm.all_reduce(small)
    warm = _timed(lambda: comm.all_reduce(large)) + _timed(lambda: comm.all_reduce(small))
    if iters is None:
        count = torch.zeros(1, dtype=torch.int64, device=device)
        if comm.rank == 0:
            count.fill_(max(1, min(MAX_LINK_ITERS, int((budget_s - 2 * warm) / warm)) if warm > 0 else MAX_LINK_ITERS))
        n = int(comm.broadcast(count, 0)[0])
    elif iters < 1:
        raise ConfigError(f"measure_link iters {iters} is invalid: expected at least 1")
    else:
        n = iters
    # Each size in one block, smalls first for the same reason; medians shrug off the first of each block.
    t_small = [_timed(lambda: comm.all_reduce(small)) for _ in range(n)]
    t_large = [_timed(lambda: comm.all_reduce(large)) for _ in range(n)]
    p_small, p_large = statistics.median(t_small), statistics.median(t_large)
    s_bytes, l_bytes = small.nbytes, large.nbytes
    transport = getattr(comm, "transport", type(comm).__name__)
    method = (
        f"all_reduce of float32 over {transport} between {comm.world_size} ranks, p50 of {n} calls each of "
        f"{s_bytes} B (latency) and {l_bytes} B"
    )
    if p_large > p_small * (1 + 1e-6):  # a difference within rounding is no difference
        bandwidth = (l_bytes - s_bytes) / (p_large - p_small) / 1e9
        method += f"; bandwidth = ({l_bytes} - {s_bytes}) B / (t_large - t_small)"
    else:  # noise swamped the difference: the whole large call is a lower bound on the link's speed
        bandwidth = l_bytes / p_large / 1e9
        method += f"; t_large <= t_small, so bandwidth = {l_bytes} B / t_large (a lower bound)"
    return {"latency_us": p_small * 1e6, "bandwidth_gbs": bandwidth, "method": method}


def host_read_bandwidth_gbs(timeout_s: float = 120.0) -> float | None:
    """read_bandwidth_gbs with every CPU of the machine, measured in a child process allowed on all of
    them, when this process is pinned to fewer (taskset; a namespace node of launch/netns-cluster.sh
    given one core): the memory bus that ranks pinned to different cores share. None when this
    process has every CPU already, or the child could not run on them."""
    cpus = os.cpu_count() or 1
    if len(os.sched_getaffinity(0)) >= cpus:
        return None
    code = "from tp_ollama.parallel.preflight import read_bandwidth_gbs; print(read_bandwidth_gbs())"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=lambda: os.sched_setaffinity(0, range(cpus)))  # fmt: skip
        return float(done.stdout.split()[-1]) if done.returncode == 0 else None
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def read_bandwidth_gbs(threads: int | None = None, nbytes: int = READ_BYTES, tries: int = TRIES) -> float:
    """A STREAM-like read bandwidth of this host: the roofline that decode, which reads every weight
    once per token, is measured against.

    The best of `tries` sums over `nbytes` of float32 with `threads` threads (default: every CPU),
    in GB/s (10^9 bytes per second). A sum reads each byte once and writes nothing, like a decode
    step's weight reads. torch's sum and, where it runs, the native read loop (four independent
    AVX-512 accumulators per thread; torch's sum reads ~10% slower on AVX-512 machines) both read it:
    the faster is the machine's bandwidth, so that a fraction of it is not flattered."""
    if nbytes < 256 or tries < 1:
        raise ValueError(f"read_bandwidth_gbs needs nbytes >= 256 and tries >= 1, got {nbytes} and {tries}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        a = torch.ones(nbytes // 4 + 16)
        offset = (-a.data_ptr() % 64) // 4  # the native loop reads whole aligned 64-byte lines
        a = a[offset : offset + (nbytes // 256) * 64]
        sums: list[Callable[[], object]] = [a.sum]
        if native.available():
            sums.append(lambda: native.read_sum(a))
        best = float("inf")
        for _ in range(tries):
            for read in sums:
                t = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - t)
        return a.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)
