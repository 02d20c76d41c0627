"""The pre-flight check of a TP group that spans hosts: measure the link it actually has, and warn
when the cost model says one node alone would decode faster over it."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from torch import nn

# Without a TP=1 measurement of this model the share of the read bandwidth decode achieves is a guess:
# about half is what the engine reaches on CPUs (bench/results/quant_decode.json, tp.json).
DEFAULT_EFFICIENCY = 0.5
PROBE_BYTES = 128 << 20  # a read bandwidth probe beyond the caches, a few tens of milliseconds


def spans_hosts() -> bool:
    """torchrun's environment: more ranks in the group than on this node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def cost_model_quant(precision: dict[str, Any]) -> str:
    """The packing most weight tensors have (describe_precision's counts), as the cost model names it."""
    kinds = Counter({k: n for k, n in precision["weights"].items() if k in ("int8", "int4")})
    return kinds.most_common(1)[0][0] if kinds else "none"


def link_preflight(comm: Any, model: nn.Module, measured: dict[str, Any] | None = None) -> str | None:
    """Run on every rank of the group (the link measurement is collective; `measured`: a link that
    measure_link already gave); rank 0 gets the warning line, or None when TP over this link is
    predicted at least as fast as one node."""
    if comm.world_size == 1 or not spans_hosts():
        return None
    if measured is None:
        from tp_ollama.bench.collectives import measure_link

        measured = measure_link(comm)
    if comm.rank != 0:
        return None
    from tp_ollama.bench.bandwidth import read_bandwidth_gbs
    from tp_ollama.bench.costmodel import Calibration, Link, predict, preflight_warning
    from tp_ollama.bench.shapes import shape_of
    from tp_ollama.kernels.loading import describe_precision

    shape = shape_of(model.config)
    precision = describe_precision(model)
    quant, dtype = cost_model_quant(precision), precision["dtype"]
    calibration = Calibration(read_bandwidth_gbs(nbytes=PROBE_BYTES, tries=2) * 1e9, DEFAULT_EFFICIENCY,
                              cores=os.cpu_count())  # fmt: skip
    link = Link.from_us_gbs(measured["latency_us"], measured["bandwidth_gbs"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    one = predict(shape, 1, link, calibration, quant, dtype)
    group = predict(shape, comm.world_size, link, calibration, quant, dtype, ranks_per_host=local)
    return preflight_warning(one, group)
