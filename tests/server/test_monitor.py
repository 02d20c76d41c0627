"""The Monitor and GET /metrics: the monitor alone on a driven clock, a scripted engine in process
(failures), and the live server (counters against a request's own counts, gauges during a stream,
cancellation)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tests.server.conftest import SMOL, LiveServer
from tests.server.doubles import EmbeddedModels, ScriptedEngine
from tests.waits import HANG_S, wait_until
from tp_ollama import __version__
from tp_ollama.errors import RequestError
from tp_ollama.server.admission import Limits
from tp_ollama.server.app import create_app
from tp_ollama.server.monitor import Monitor
from tp_ollama.server.schemas import GenerateRequest
from tp_ollama.server.text_service import TextService

GREEDY = {"temperature": 0, "seed": 1}
HELLO = [19556, 905]  # SmolLM2 ids of "Hello world"
FAMILIES = {
    "tp_ollama_request_duration_seconds": "histogram",
    "tp_ollama_time_to_first_token_seconds": "histogram",
    "tp_ollama_time_per_output_token_seconds": "histogram",
    "tp_ollama_requests": "counter",
    "tp_ollama_prompt_tokens": "counter",
    "tp_ollama_generation_tokens": "counter",
    "tp_ollama_collective_seconds": "counter",
    "tp_ollama_num_requests_running": "gauge",
    "tp_ollama_num_requests_waiting": "gauge",
    "tp_ollama_model_loaded": "gauge",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """({family: type}, {(sample name, sorted labels): value})."""
    kinds, samples = {}, {}
    for family in text_string_to_metric_families(text):
        kinds[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return kinds, samples


def scrape(http: httpx.Client | TestClient) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)[1]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# --- the monitor alone ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


def test_monitor_follows_a_request_from_queued_to_finished():
    clock = Clock()
    monitor = Monitor(loaded_model=lambda: "m:1b", clock=clock)
    track = monitor.queued("m:1b", prompt_tokens=7, num_predict=10, arrived_ns=clock(), endpoint="/api/generate")
    assert monitor.counts() == (0, 1)
    [entry] = monitor.active()
    assert entry["state"] == "queued" and entry["prompt_tokens"] == 7 and entry["num_predict"] == 10
    clock.advance(0.5)
    monitor.running(track)
    assert monitor.counts() == (1, 0)
    clock.advance(0.25)
    for _ in range(4):
        monitor.token(track)
        clock.advance(0.1)
    [entry] = monitor.active()
    assert entry["state"] == "running" and entry["tokens_generated"] == 4
    assert entry["tokens_per_second"] == pytest.approx(4 / 0.65)
    monitor.finished(track, eval_count=4, eval_duration=400_000_000, comm_duration=100_000_000)
    monitor.cancelled(track)  # a request ends once: no second count
    assert monitor.active() == [] and monitor.served == {"success": 1, "error": 0, "cancelled": 0}
    samples = parse(monitor.exposition().decode())[1]
    assert value(samples, "tp_ollama_requests_total", endpoint="/api/generate", status="success") == 1
    assert value(samples, "tp_ollama_prompt_tokens_total", model="m:1b") == 7
    assert value(samples, "tp_ollama_generation_tokens_total", model="m:1b") == 4
    assert value(samples, "tp_ollama_collective_seconds_total", model="m:1b") == pytest.approx(0.1)
    assert value(samples, "tp_ollama_time_to_first_token_seconds_sum", model="m:1b") == pytest.approx(0.75)
    assert value(samples, "tp_ollama_time_per_output_token_seconds_count", model="m:1b") == 3
    assert value(samples, "tp_ollama_time_per_output_token_seconds_sum", model="m:1b") == pytest.approx(0.3)
    assert value(samples, "tp_ollama_request_duration_seconds_sum", endpoint="/api/generate", model="m:1b") == (
        pytest.approx(1.15)
    )
    assert value(samples, "tp_ollama_model_loaded", model="m:1b") == 1
    assert value(samples, "tp_ollama_num_requests_running") == 0


def test_monitor_step_and_collective_times_are_token_weighted_means_of_recent_requests():
    monitor = Monitor(clock=Clock())
    for eval_count, eval_ms, comm_ms in ((10, 100, 20), (30, 600, 30)):
        track = monitor.queued("m", 1, 0, arrived_ns=0, endpoint="/api/chat")
        monitor.running(track)
        monitor.finished(track, eval_count=eval_count, eval_duration=eval_ms * 10**6, comm_duration=comm_ms * 10**6)
    snap = monitor.snapshot()
    assert snap["step_time_ms"] == pytest.approx(700 / 40)
    assert snap["collective_ms_per_token"] == pytest.approx(50 / 40)
    assert snap["averaged_over_requests"] == 2
    # Tokens the engine counted but never streamed one by one still count as generated.
    assert snap["generation_tokens_total"] == 40


def test_monitor_recent_throughput_covers_the_last_ten_seconds():
    clock = Clock()
    monitor = Monitor(clock=clock)
    track = monitor.queued("m", 1, 100, arrived_ns=clock(), endpoint="/api/generate")
    monitor.running(track)
    clock.advance(20)  # the monitor has been up 20 s
    for _ in range(50):  # 50 tokens over 5 s
        monitor.token(track)
        clock.advance(0.1)
    snap = monitor.snapshot()
    assert snap["tokens_per_second"]["recent"] == pytest.approx(5.0)
    assert snap["tokens_per_second"]["overall"] == pytest.approx(50 / 25)
    clock.advance(10)  # nothing in the last 10 s
    assert monitor.snapshot()["tokens_per_second"]["recent"] == 0.0


def test_monitor_counts_failures_and_cancellations_by_endpoint():
    monitor = Monitor(clock=Clock())
    failed = monitor.queued("m", 1, 0, arrived_ns=0, endpoint="/api/chat")
    cancelled = monitor.queued("m", 1, 0, arrived_ns=0, endpoint="/v1/completions")
    monitor.failed(failed)
    monitor.cancelled(cancelled)
    monitor.failed(cancelled)
    samples = parse(monitor.exposition().decode())[1]
    assert value(samples, "tp_ollama_requests_total", endpoint="/api/chat", status="error") == 1
    assert value(samples, "tp_ollama_requests_total", endpoint="/v1/completions", status="cancelled") == 1
    assert value(samples, "tp_ollama_requests_total", endpoint="/v1/completions", status="error") == 0
    assert monitor.active() == []


# --- a scripted engine in process --------------------------------------------------------------------


def test_a_generation_that_fails_mid_stream_is_an_error_and_leaves_no_active_request():
    engine = ScriptedEngine(HELLO, fail_with=RequestError("the engine fell over"))
    app = create_app(engine, EmbeddedModels(), version=__version__)
    with TestClient(app, base_url="http://localhost") as client:  # the Host guard refuses "testserver"
        response = client.post("/api/generate", json={"model": SMOL, "prompt": "Hi"})
        assert json.loads(response.text.splitlines()[-1]) == {"error": "the engine fell over"}
        samples = scrape(client)
        assert value(samples, "tp_ollama_requests_total", endpoint="/api/generate", status="error") == 1
        assert value(samples, "tp_ollama_requests_total", endpoint="/api/generate", status="success") == 0
        assert value(samples, "tp_ollama_generation_tokens_total", model=SMOL) == len(HELLO)
        assert client.get("/api/distributed/requests").json() == {"requests": []}


def test_a_lease_whose_stream_never_ran_still_ends_its_request():
    """The client left between the lease and the first byte: nothing iterates the stream, yet the
    request must not stay listed once the lease is gone."""

    async def scenario() -> None:
        models = EmbeddedModels()
        service = TextService(ScriptedEngine(HELLO), models, Limits())
        job = await service.generate_job(GenerateRequest(SMOL, "Hi"), models.resolve(SMOL), time.perf_counter_ns())
        lease = await service.start(job)
        assert service.monitor.counts() == (1, 0)
        lease.release()
        del lease
        assert service.monitor.active() == [] and service.monitor.served["cancelled"] == 1

    asyncio.run(scenario())


# --- the live server ---------------------------------------------------------------------------------


@pytest.fixture
def other(server: LiveServer) -> Iterator[httpx.Client]:
    """A second client, for looking while `http` streams."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_metrics_is_prometheus_text_with_every_tp_ollama_family(http):
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    kinds, _ = parse(response.text)
    assert {name: kinds.get(name) for name in FAMILIES} == FAMILIES


def test_counters_move_by_a_known_requests_counts(http):
    before = scrape(http)
    reply = http.post(
        "/api/generate",
        json={"model": SMOL, "prompt": "Name three colours.", "stream": False, "options": {**GREEDY, "num_predict": 6}},
    ).json()
    after = scrape(http)
    assert reply["eval_count"] == 6
    assert delta(before, after, "tp_ollama_generation_tokens_total", model=SMOL) == reply["eval_count"]
    assert delta(before, after, "tp_ollama_prompt_tokens_total", model=SMOL) == reply["prompt_eval_count"]
    assert delta(before, after, "tp_ollama_requests_total", endpoint="/api/generate", status="success") == 1
    labels = {"endpoint": "/api/generate", "model": SMOL}
    assert delta(before, after, "tp_ollama_request_duration_seconds_count", **labels) == 1
    seconds = delta(before, after, "tp_ollama_request_duration_seconds_sum", **labels)
    # The same request's span: from its arrival, past the engine's prefill and decode, to its end, which
    # the histogram records just before the reply's total_duration is taken.
    assert (reply["prompt_eval_duration"] + reply["eval_duration"]) / 1e9 <= seconds <= reply["total_duration"] / 1e9
    assert delta(before, after, "tp_ollama_time_to_first_token_seconds_count", model=SMOL) == 1
    assert delta(before, after, "tp_ollama_time_per_output_token_seconds_count", model=SMOL) == 5
    assert delta(before, after, "tp_ollama_collective_seconds_total", model=SMOL) == 0  # one rank: no collectives
    assert value(after, "tp_ollama_model_loaded", model=SMOL) == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/api/chat",
            {"messages": [{"role": "user", "content": "Hi"}], "stream": False, "options": {"num_predict": 2}},
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/api/embed", {"input": ["one", "two"]}),
        ("/api/embeddings", {"prompt": "one"}),
        ("/v1/embeddings", {"input": "one"}),
    ],
)
def test_every_route_that_uses_the_model_is_counted_under_its_path(http, path, body):
    before = scrape(http)
    response = http.post(path, json={"model": SMOL, **body})
    assert response.status_code == 200, response.text
    after = scrape(http)
    assert delta(before, after, "tp_ollama_requests_total", endpoint=path, status="success") == 1
    assert delta(before, after, "tp_ollama_prompt_tokens_total", model=SMOL) > 0


def test_the_running_gauge_is_one_during_a_streamed_generation_and_zero_after(http, other):
    body = {"model": SMOL, "prompt": "Count from one to twenty:", "options": {**GREEDY, "num_predict": 24}}
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
        during = scrape(other)
        assert value(during, "tp_ollama_num_requests_running") == 1
        assert value(during, "tp_ollama_num_requests_waiting") == 0
        assert json.loads(list(lines)[-1])["done"] is True
    after = scrape(other)
    assert value(after, "tp_ollama_num_requests_running") == 0
    assert value(after, "tp_ollama_num_requests_waiting") == 0


def test_a_stream_closed_early_is_cancelled_and_leaves_no_active_request(server, http, other):
    before = scrape(other)
    body = {"model": SMOL, "prompt": "Count from one to a thousand:", "options": {**GREEDY, "num_predict": 2000}}
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
        assert len(other.get("/api/distributed/requests").json()["requests"]) == 1
    # The server learns of the disconnect asynchronously.
    wait_until(lambda: not other.get("/api/distributed/requests").json()["requests"], what="the closed stream unlisted")
    assert server.engine.wait_idle(timeout=HANG_S)
    after = scrape(other)
    assert delta(before, after, "tp_ollama_requests_total", endpoint="/api/generate", status="cancelled") == 1
    assert value(after, "tp_ollama_num_requests_running") == 0
    snap = other.get("/api/distributed/metrics").json()
    assert snap["requests"]["running"] == 0 and snap["requests"]["cancelled"] >= 1


def test_distributed_metrics_report_throughput_and_step_time(http):
    before = http.get("/api/distributed/metrics").json()
    reply = http.post(
        "/api/generate",
        json={"model": SMOL, "prompt": "Say hello.", "stream": False, "options": {**GREEDY, "num_predict": 8}},
    ).json()
    snap = http.get("/api/distributed/metrics").json()
    assert snap["requests"]["served"] == before["requests"]["served"] + 1
    assert snap["generation_tokens_total"] == before["generation_tokens_total"] + reply["eval_count"]
    assert snap["tokens_per_second"]["recent"] > 0 and snap["tokens_per_second"]["overall"] > 0
    assert snap["step_time_ms"] > 0 and snap["collective_ms_per_token"] == 0
    assert snap["queue_depth"] == 0 and snap["uptime_seconds"] > before["uptime_seconds"]
