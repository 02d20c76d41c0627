"""A STREAM-like read bandwidth of this host: the roofline that decode, which reads every weight once
per token, is measured against."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

READ_BYTES = 1 << 30  # 1 GiB: far beyond any cache, so the figure is DRAM's
TRIES = 5


def read_bandwidth_gbs(threads: int | None = None, nbytes: int = READ_BYTES, tries: int = TRIES) -> float:
    """The best of `tries` sums over `nbytes` of float32 with `threads` threads (default: every CPU),
    in GB/s (10^9 bytes per second). A sum reads each byte once and writes nothing, like a decode
    step's weight reads. torch's sum and, where it runs, the native read loop (four independent
    AVX-512 accumulators per thread; torch's sum reads ~10% slower on AVX-512 machines) both read it:
    the faster is the machine's bandwidth, so that a fraction of it is not flattered."""
    import torch

    from tp_ollama.kernels import native

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


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM, which starts afresh at exec (ru_maxrss carries
    the parent's peak over into a spawned child)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
