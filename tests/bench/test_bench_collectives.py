"""tp_ollama.bench.collectives: a real two-rank run of every backend through tp_ollama.launch, and
measure_link's arithmetic and time bound against a simulated link on a simulated clock."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch

from tp_ollama.bench import collectives, report
from tp_ollama.bench.collectives import measure_link, run_collectives
from tp_ollama.errors import ConfigError

SIZES = [64, 4096]


def test_two_ranks_measure_every_backend_op_and_size() -> None:
    # tcp first: on one host the link is measured on the first backend, here a real 2-rank tcp group.
    out = run_collectives(["tcp", "shm", "gloo"], SIZES, world=2, iters=10, progress=False, argv=["bench"])
    assert out is not None
    report.validate(out)
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


# ---- measure_link against a simulated link -----------------------------------------------------


class SimulatedLink:
    """Test double of a communicator whose all-reduce costs `latency_s + bytes / rate` on a simulated
    clock (installed as the module's `time`), so the figures measure_link derives are known exactly."""

    rank, world_size, transport = 0, 2, "simulated"

    def __init__(self, latency_s: float, rate_bytes_s: float | None) -> None:
        self.latency_s, self.rate = latency_s, rate_bytes_s
        self.now = 0.0
        self.calls = 0
        self.broadcasts = 0

    def perf_counter(self) -> float:
        return self.now

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.now += self.latency_s + (t.nbytes / self.rate if self.rate else 0.0)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.broadcasts += 1
        return t


def simulated(monkeypatch: pytest.MonkeyPatch, latency_s: float, rate: float | None) -> SimulatedLink:
    link = SimulatedLink(latency_s, rate)
    monkeypatch.setattr(collectives, "time", SimpleNamespace(perf_counter=link.perf_counter))
    return link


def test_measure_link_recovers_latency_and_bandwidth(monkeypatch: pytest.MonkeyPatch) -> None:
    link = simulated(monkeypatch, latency_s=5e-3, rate=1e8)
    got = measure_link(link)
    assert got["latency_us"] == pytest.approx((5e-3 + 64 / 1e8) * 1e6)
    assert got["bandwidth_gbs"] == pytest.approx(0.1)  # 1e8 B/s: the fixed 5 ms cancels out
    assert "over simulated between 2 ranks" in got["method"] and "(t_large - t_small)" in got["method"]
    assert link.broadcasts == 1  # rank 0's iteration count, shared so that every rank runs as many


@pytest.mark.parametrize(("latency_s", "rate"), [(1e-5, 1e10), (1e-3, 1e9), (4e-2, 1e7), (0.5, 1e6)])
def test_measure_link_stays_within_its_time_budget(
    monkeypatch: pytest.MonkeyPatch, latency_s: float, rate: float
) -> None:
    link = simulated(monkeypatch, latency_s, rate)
    measure_link(link, budget_s=0.1)
    pair = 2 * latency_s + (64 + (1 << 20)) / rate
    timed_pairs = link.calls // 2 - 1  # after the warm-up pair
    assert 1 <= timed_pairs <= collectives.MAX_LINK_ITERS
    # The whole measurement fits the budget, except on a link too slow for even two pairs.
    assert link.now <= max(0.1, 2 * pair) + 1e-9


def test_measure_link_with_given_iterations_and_a_flat_link(monkeypatch: pytest.MonkeyPatch) -> None:
    link = simulated(monkeypatch, latency_s=1e-3, rate=None)  # cost independent of size: noise-like
    got = measure_link(link, iters=3)
    assert link.calls == 2 + 2 * 3 and link.broadcasts == 0
    assert got["bandwidth_gbs"] == pytest.approx((1 << 20) / 1e-3 / 1e9)
    assert "lower bound" in got["method"]
    with pytest.raises(ConfigError, match="expected 4 <= small < large"):
        measure_link(link, small_bytes=1 << 20, large_bytes=64)
