"""tp_ollama.bench.collectives: a real two-rank run of every backend through tp_ollama.launch."""

from __future__ import annotations

import itertools
from typing import Any

import psutil
import pytest

from tp_ollama.bench import schema as bench_schema
from tp_ollama.bench.collectives import run_collectives
from tp_ollama.errors import ConfigError

SIZES = [64, 4096]


def test_two_ranks_measure_every_backend_op_and_size() -> None:
    # tcp first: on one host the link is measured on the first backend, here a real 2-rank tcp group.
    out = run_collectives(["tcp", "shm", "gloo"], SIZES, world=2, iters=10, progress=False, argv=["bench"])
    assert out is not None
    bench_schema.validate(out)
    assert out["kind"] == "collectives"
    cells = {(r["target"], r["config"]["op"], r["config"]["bytes"]) for r in out["results"]}
    assert cells == set(itertools.product(["tcp", "shm", "gloo"], ["all_reduce", "broadcast"], SIZES))
    for r in out["results"]:
        assert r["config"]["ranks"] == 2 and r["config"]["nodes"] == 1
        assert r["latency_us"]["n"] == 10 and 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"]
        assert r["bandwidth_gbs"] == pytest.approx(r["config"]["bytes"] / r["latency_us"]["p50"] / 1e3)
        assert len(r["extra"]["rank_p50_us"]) == 2 and all(t > 0 for t in r["extra"]["rank_p50_us"])
    link = out["link"]
    assert "over tcp between 2 ranks" in link["method"]
    assert link["latency_us"] > 0 and link["bandwidth_gbs"] > 0
    assert ranks_left() == []  # every rank has exited


def ranks_left() -> list[psutil.Process]:
    """This process's children, less multiprocessing's resource tracker (it lives as long as we do)."""
    children = psutil.Process().children(recursive=True)
    return [p for p in children if "multiprocessing.resource_tracker" not in " ".join(p.cmdline())]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backends": ["nccl"]}, "expected one or more of shm, tcp, gloo"),
        ({"backends": ["tcp", "tcp"]}, "repeat a backend"),
        ({"sizes": [64, 10]}, r"message sizes \[10\] are invalid: expected byte counts, multiples of 4"),
        ({"world": 1}, "expected at least 2 ranks in all"),
        ({"iters": 0}, "iters 0 is invalid"),
    ],
)
def test_bad_settings_fail_before_any_rank_starts(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"backends": ["tcp"], "sizes": SIZES, **kwargs}
    with pytest.raises(ConfigError, match=message):
        run_collectives(progress=False, **args)
