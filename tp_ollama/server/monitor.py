"""What the server is doing right now, and has done: one `Monitor` per app, which the text service
(every generation passes TextService.start/stream) and the embedding routes report to.

It keeps the active requests with their progress, recent and overall throughput, the mean decode
step time and time in collectives per token over the last requests, and Prometheus metrics in a
registry of its own (vLLM / ollama-exporter style names under `tp_ollama_`), served on /metrics.
All calls come from the event loop; none blocks.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Receive, Scope, Send

THROUGHPUT_WINDOW_S = 10.0
RECENT_REQUESTS = 32  # step time and collective time are averaged over this many finished requests

# The HTTP path of the request being handled, set by EndpointTag: TextService.start learns from it
# which route a generation came through without every route having to say so.
current_endpoint: ContextVar[str] = ContextVar("tp_ollama_endpoint", default="")


class EndpointTag:
    """ASGI middleware: sets `current_endpoint` to the request's path for the handler and its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = current_endpoint.set(scope["path"])
        try:
            await self.app(scope, receive, send)
        finally:
            current_endpoint.reset(token)


@dataclass
class Track:
    """One request from arrival to its end; times are the monitor's clock (perf_counter_ns) unless named _unix."""

    id: str
    endpoint: str
    model: str
    prompt_tokens: int
    num_predict: int  # 0 for embeddings
    arrived_ns: int
    arrived_unix: float
    state: str = "queued"  # queued (waiting for the model) -> running
    running_ns: int = 0
    last_token_ns: int = 0
    tokens: int = 0
    ended: bool = False

    def describe(self, now_ns: int) -> dict[str, Any]:
        running_s = (now_ns - self.running_ns) / 1e9 if self.state == "running" else 0.0
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "model": self.model,
            "state": self.state,
            "started_at": self.arrived_unix,
            "elapsed_seconds": (now_ns - self.arrived_ns) / 1e9,
            "prompt_tokens": self.prompt_tokens,
            "tokens_generated": self.tokens,
            "num_predict": self.num_predict,
            # Since the request got the model: prompt processing included.
            "tokens_per_second": self.tokens / running_s if running_s > 0 else 0.0,
        }


_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class Monitor:
    """`loaded_model` names the model on the engine now (None when there is none), for the
    tp_ollama_model_loaded gauge; `replicas` gives each engine group's counters (ReplicaSet.stats()),
    for the per-replica families. `clock` is time.perf_counter_ns unless a test drives the time."""

    def __init__(
        self,
        loaded_model: Callable[[], str | None] = lambda: None,
        clock: Callable[[], int] = time.perf_counter_ns,
        replicas: Callable[[], list[dict[str, Any]]] = lambda: [],
        membership: Callable[[], dict[str, Any]] = lambda: {},
    ) -> None:
        self.loaded_model = loaded_model
        self.replicas = replicas
        self.membership = membership
        self._clock = clock
        self._ids = itertools.count(1)
        self._active: dict[str, Track] = {}
        self._started_ns = self._clock()
        self._token_times: deque[int] = deque()  # one entry per token of the last THROUGHPUT_WINDOW_S
        self._steps: deque[tuple[int, int, int]] = deque(maxlen=RECENT_REQUESTS)  # (eval ns, comm ns, tokens)
        self.generated = 0
        self.prompt_tokens = 0
        self.served = {"success": 0, "error": 0, "cancelled": 0}
        self.kv_cache: dict[str, int] = {}  # the engines' KV caches, as last reported

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._duration = Histogram(
            "tp_ollama_request_duration_seconds",
            "Time from a request's arrival to its end.",
            ["endpoint", "model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "tp_ollama_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self._tpot = Histogram(
            "tp_ollama_time_per_output_token_seconds",
            "Time between consecutive generated tokens of a request.",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self._requests = Counter(
            "tp_ollama_requests_total",
            "Requests that reached the model, by how they ended (success, error, cancelled).",
            ["endpoint", "status"],
            registry=r,
        )
        self._prompt_counter = Counter(
            "tp_ollama_prompt_tokens_total", "Prompt tokens of requests that got the model.", ["model"], registry=r
        )
        self._generation_counter = Counter(
            "tp_ollama_generation_tokens_total", "Generated tokens.", ["model"], registry=r
        )
        self._collective = Counter(
            "tp_ollama_collective_seconds_total",
            "Time the tensor-parallel group spent in collectives during requests.",
            ["model"],
            registry=r,
        )
        r.register(_Gauges(self))

    # --- reports ---------------------------------------------------------------------------------

    def queued(self, model: str, prompt_tokens: int, num_predict: int, arrived_ns: int, endpoint: str = "") -> Track:
        """A request is waiting for the model. `arrived_ns` (perf_counter_ns) is when its HTTP request
        came in; `endpoint` defaults to the path of the request being handled."""
        track = Track(
            id=f"req-{next(self._ids)}",
            endpoint=endpoint or current_endpoint.get() or "unknown",
            model=model,
            prompt_tokens=prompt_tokens,
            num_predict=num_predict,
            arrived_ns=arrived_ns,
            arrived_unix=time.time() - (self._clock() - arrived_ns) / 1e9,
        )
        self._active[track.id] = track
        return track

    def running(self, track: Track) -> None:
        """The request holds the model; its prompt goes to the engine."""
        if track.ended:
            return
        track.state = "running"
        track.running_ns = self._clock()
        self.prompt_tokens += track.prompt_tokens
        self._prompt_counter.labels(track.model).inc(track.prompt_tokens)

    def token(self, track: Track) -> None:
        if track.ended:
            return
        now = self._clock()
        if track.tokens == 0:
            self._ttft.labels(track.model).observe((now - track.arrived_ns) / 1e9)
        else:
            self._tpot.labels(track.model).observe((now - track.last_token_ns) / 1e9)
        track.tokens += 1
        track.last_token_ns = now
        self.generated += 1
        self._generation_counter.labels(track.model).inc()
        self._token_times.append(now)
        self._forget_before(now)

    def finished(self, track: Track, *, eval_count: int = 0, eval_duration: int = 0, comm_duration: int = 0) -> None:
        """The request ended normally. Counts and durations (ns) are the engine's final figures."""
        if track.ended:
            return
        if eval_count > track.tokens:  # tokens the engine counted but did not hand on one by one
            extra = eval_count - track.tokens
            self.generated += extra
            self._generation_counter.labels(track.model).inc(extra)
        if eval_count > 0:
            self._steps.append((eval_duration, comm_duration, eval_count))
        if comm_duration > 0:
            self._collective.labels(track.model).inc(comm_duration / 1e9)
        self._end(track, "success")

    def failed(self, track: Track) -> None:
        self._end(track, "error")

    def cancelled(self, track: Track) -> None:
        """The client went away or closed the stream early; a no-op for a request that has ended."""
        self._end(track, "cancelled")

    def _end(self, track: Track, status: str) -> None:
        if track.ended:
            return
        track.ended = True
        self._active.pop(track.id, None)
        self.served[status] += 1
        self._requests.labels(track.endpoint, status).inc()
        self._duration.labels(track.endpoint, track.model).observe((self._clock() - track.arrived_ns) / 1e9)

    # --- views -----------------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """The requests that have not ended, oldest first."""
        now = self._clock()
        return [t.describe(now) for t in self._active.values()]

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        running = sum(1 for t in self._active.values() if t.state == "running")
        return running, len(self._active) - running

    def uptime_seconds(self) -> float:
        return (self._clock() - self._started_ns) / 1e9

    def snapshot(self) -> dict[str, Any]:
        """/api/distributed/metrics."""
        now = self._clock()
        self._forget_before(now)
        uptime = (now - self._started_ns) / 1e9
        window = min(THROUGHPUT_WINDOW_S, uptime)
        eval_ns = sum(s[0] for s in self._steps)
        comm_ns = sum(s[1] for s in self._steps)
        steps = sum(s[2] for s in self._steps)
        running, waiting = self.counts()
        return {
            "uptime_seconds": uptime,
            "tokens_per_second": {
                "recent": len(self._token_times) / window if window > 0 else 0.0,
                "recent_window_seconds": THROUGHPUT_WINDOW_S,
                "overall": self.generated / uptime if uptime > 0 else 0.0,
            },
            "requests": {
                "running": running,
                "waiting": waiting,
                "served": sum(self.served.values()),
                **self.served,
            },
            "queue_depth": waiting,
            # Means over the last RECENT_REQUESTS requests that generated, weighted by their tokens.
            "step_time_ms": eval_ns / steps / 1e6 if steps else None,
            "collective_ms_per_token": comm_ns / steps / 1e6 if steps else None,
            "averaged_over_requests": len(self._steps),
            "prompt_tokens_total": self.prompt_tokens,
            "generation_tokens_total": self.generated,
            # Per engine group: requests running there now, routed there in all, failed there.
            "replicas": self.replicas(),
            # The engines' paged KV caches, summed over replicas: blocks by state, prefix reuse.
            "kv_cache": self.kv_cache,
        }

    def engine_facts(self, facts: Mapping[str, Any]) -> None:
        """Remember the engines' KV cache counters from Engine.cluster() (one group, or every replica)."""
        caches = [r["kv_cache"] for r in facts.get("replicas", []) if r.get("kv_cache")]
        if not caches and facts.get("kv_cache"):
            caches = [facts["kv_cache"]]
        keys = ("blocks", "blocks_used", "blocks_free", "blocks_cached", "prefix_hits", "prefix_misses",
                "prefix_hit_tokens", "evictions")  # fmt: skip
        self.kv_cache = {k: sum(int(c.get(k, 0)) for c in caches) for k in keys} if caches else {}

    def exposition(self) -> bytes:
        """Prometheus text format of this monitor's registry."""
        return generate_latest(self.registry)

    def _forget_before(self, now_ns: int) -> None:
        horizon = now_ns - int(THROUGHPUT_WINDOW_S * 1e9)
        times = self._token_times
        while times and times[0] < horizon:
            times.popleft()


def _kv_families(kv: Mapping[str, int]) -> Iterator[Metric]:
    """The engines' KV caches, summed over replicas, as last reported (see Monitor.engine_facts)."""
    blocks = GaugeMetricFamily("tp_ollama_kv_cache_blocks", "KV cache blocks by state.", labels=["state"])
    for state in ("used", "free", "cached"):
        blocks.add_metric([state], kv.get(f"blocks_{state}", 0))
    yield blocks
    yield CounterMetricFamily(
        "tp_ollama_prefix_cache_hits", "Prompt blocks taken from the prefix cache.", value=kv.get("prefix_hits", 0)
    )
    yield CounterMetricFamily(
        "tp_ollama_prefix_cache_misses", "Full prompt blocks not found in the prefix cache.",
        value=kv.get("prefix_misses", 0),
    )  # fmt: skip
    yield CounterMetricFamily(
        "tp_ollama_prefix_cache_hit_tokens", "Prompt tokens whose prefill the prefix cache saved.",
        value=kv.get("prefix_hit_tokens", 0),
    )  # fmt: skip


def _membership_families(membership: Mapping[str, Any]) -> Iterator[Metric]:
    """Failures of the engine groups and their recoveries (tp_ollama.membership.events), summed over
    replicas, and the state of the cluster as a 0/1 gauge per state."""
    counters = membership.get("counters", {})
    for name, key, text in (
        ("tp_ollama_group_failures", "failures", "Engine group failures detected (a rank or node lost or hung)."),
        ("tp_ollama_group_recoveries", "recoveries", "Engine groups formed again and serving after a failure."),
        ("tp_ollama_replayed_requests", "replayed_requests", "Requests resubmitted to a new group mid-answer."),
        ("tp_ollama_recovery_seconds", "recovery_seconds", "Seconds from failures to serving again, in all."),
    ):
        yield CounterMetricFamily(name, text, value=counters.get(key, 0))
    state = GaugeMetricFamily("tp_ollama_cluster_state", "1 for the cluster's state now.", labels=["state"])
    for name in ("healthy", "degraded", "recovering"):
        state.add_metric([name], 1 if membership.get("state", "healthy") == name else 0)
    yield state


class _Gauges:
    """Gauges read at scrape time from the monitor's state, so they can never drift from it."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def describe(self) -> Iterable[Metric]:
        return self._families(0, 0, None, [])

    def collect(self) -> Iterable[Metric]:
        running, waiting = self._monitor.counts()
        yield from self._families(running, waiting, self._monitor.loaded_model(), self._monitor.replicas())
        yield from _kv_families(self._monitor.kv_cache)
        yield from _membership_families(self._monitor.membership())

    @staticmethod
    def _families(running: int, waiting: int, model: str | None, replicas: list[dict[str, Any]]) -> Iterator[Metric]:
        yield GaugeMetricFamily("tp_ollama_num_requests_running", "Requests holding the model.", value=running)
        yield GaugeMetricFamily(
            "tp_ollama_num_requests_waiting", "Requests waiting for the model to be free or loaded.", value=waiting
        )
        loaded = GaugeMetricFamily("tp_ollama_model_loaded", "1 for the model on the engine now.", labels=["model"])
        if model is not None:
            loaded.add_metric([model], 1)
        yield loaded
        per_running = GaugeMetricFamily(
            "tp_ollama_replica_requests_running", "Requests in each engine group now.", labels=["replica"]
        )
        per_total = CounterMetricFamily(
            "tp_ollama_replica_requests", "Requests routed to each engine group.", labels=["replica"]
        )
        for r in replicas:
            per_running.add_metric([str(r["replica"])], r["running"])
            per_total.add_metric([str(r["replica"])], r["requests_total"])
        yield per_running
        yield per_total
