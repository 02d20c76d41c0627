"""ReplicaSet (server/replicas.py): routing, load and unload on every replica, the merged cluster view,
and the cluster endpoints' per-replica numbers -- over two scripted engines, which can hold requests
running on demand -- then `tp-ollama serve --replicas 2 --tp 1` as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import SMOL, serving
from tests.server.doubles import EmbeddedModels, ScriptedEngine
from tests.waits import HANG_S, wait_until, wait_until_async
from tp_ollama import __version__
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.errors import ConfigError
from tp_ollama.launch import free_port
from tp_ollama.server.admission import Limits
from tp_ollama.server.app import create_app
from tp_ollama.server.engine_api import LoadRequest, TokenEvent
from tp_ollama.server.replicas import ReplicaSet
from tp_ollama.server.text_service import TextService

HELLO = [19556, 905]  # SmolLM2 ids of "Hello world"
MODEL = LoadRequest(Path("/models/smol.gguf"))  # never read: the engines are scripted


def held() -> ScriptedEngine:
    engine = ScriptedEngine(HELLO)
    engine.hold = True
    return engine


async def start(replicas: ReplicaSet, prompt: list[int]) -> asyncio.Future[TokenEvent]:
    """Open a generation and wait until it has reached its engine, where a held engine keeps it running;
    cancelling the returned step is its client going away."""
    stream = replicas.generate(prompt, GenerationOptions(), frozenset())
    step = asyncio.ensure_future(anext(stream))  # the replica is picked on the first step

    def in_an_engine() -> bool:
        if step.done():
            step.result()  # the request failed on its way: say how
        return any(isinstance(r.engine, ScriptedEngine) and prompt in r.engine.prompts for r in replicas.replicas)

    await wait_until_async(in_an_engine, what=f"prompt {prompt} in an engine")
    assert not step.done()
    return step


async def leave(step: asyncio.Future[TokenEvent]) -> None:
    step.cancel()
    await asyncio.gather(step, return_exceptions=True)


def running(replicas: ReplicaSet) -> list[int]:
    return [r.running for r in replicas.replicas]


def test_least_loaded_routes_to_the_replica_with_the_fewest_running_requests_ties_to_the_lowest():
    async def scenario() -> None:
        a, b = held(), held()
        replicas = ReplicaSet([a, b])
        await replicas.load(MODEL)
        first = await start(replicas, [1])
        second = await start(replicas, [2])
        third = await start(replicas, [3])
        assert running(replicas) == [2, 1]
        assert (a.prompts, b.prompts) == ([[1], [3]], [[2]])
        for step in (first, third):
            await leave(step)  # a client gone: its replica's count drops at once
        assert running(replicas) == [0, 1]
        fourth = await start(replicas, [4])
        assert b.prompts == [[2]] and a.prompts[-1] == [4]
        assert [r.requests_total for r in replicas.replicas] == [3, 1]
        await leave(second)
        # Embeddings go the same way: replica 1 is idle, replica 0 runs the fourth request.
        assert await replicas.embed([[1, 2]]) == [[2.0, 1.0, 3.0]]
        assert [r.requests_total for r in replicas.replicas] == [3, 2]
        await leave(fourth)
        assert running(replicas) == [0, 0]

    asyncio.run(scenario())


def test_round_robin_takes_turns_and_passes_over_a_full_replica():
    async def scenario() -> None:
        a, b = ScriptedEngine(HELLO), ScriptedEngine(HELLO)
        replicas = ReplicaSet([a, b], "round_robin", slots=1)
        await replicas.load(MODEL)
        for prompt in range(4):  # one after another: least_loaded would always pick the first
            events = [e async for e in replicas.generate([prompt], GenerationOptions(), frozenset())]
            assert events[-1].done
        assert (a.prompts, b.prompts) == ([[0], [2]], [[1], [3]])
        a.hold = True
        busy = await start(replicas, [4])  # replica 0's turn; it stays running there
        assert running(replicas) == [1, 0]
        _ = [e async for e in replicas.generate([5], GenerationOptions(), frozenset())]  # replica 1's turn
        _ = [e async for e in replicas.generate([6], GenerationOptions(), frozenset())]  # 0 is full: 1 again
        assert b.prompts[-2:] == [[5], [6]] and a.prompts[-1] == [4]
        await leave(busy)

    asyncio.run(scenario())


def test_load_and_unload_apply_to_every_replica_and_one_that_lost_the_model_is_passed_over():
    async def scenario() -> None:
        a, b = ScriptedEngine(HELLO), ScriptedEngine(HELLO)
        replicas = ReplicaSet([a, b])
        assert replicas.loaded() is None
        loaded = await replicas.load(MODEL)
        assert a.loads == b.loads == [MODEL.path] and replicas.loaded() == loaded
        await a.unload()  # replica 0 lost its model (its group died and restarted empty)
        assert replicas.loaded() is None  # so the scheduler loads it again before the next request
        assert [s["ready"] for s in replicas.stats()] == [False, True]
        _ = [e async for e in replicas.generate([7], GenerationOptions(), frozenset())]
        assert (a.prompts, b.prompts) == ([], [[7]])  # routing passed over replica 0
        await replicas.load(MODEL)
        assert a.loads == [MODEL.path, MODEL.path] and replicas.loaded() is not None
        await replicas.unload()
        assert a.unloaded.is_set() and b.unloaded.is_set() and replicas.loaded() is None

    asyncio.run(scenario())


def test_cluster_merges_every_replicas_ranks_and_load():
    async def scenario() -> None:
        a, b = held(), held()
        replicas = ReplicaSet([a, b])
        await replicas.load(MODEL)
        step = await start(replicas, [1])
        facts = await replicas.cluster()
        assert facts["world_size"] == 2
        assert [(r["replica"], r["rank"], r["alive"]) for r in facts["ranks"]] == [(0, 0, True), (1, 0, True)]
        assert facts["replicas"] == [
            {"replica": 0, "running": 1, "requests_total": 1, "failed_total": 0, "ready": True, "world_size": 1,
             "alive": True},
            {"replica": 1, "running": 0, "requests_total": 0, "failed_total": 0, "ready": True, "world_size": 1,
             "alive": True},
        ]  # fmt: skip
        await leave(step)

    asyncio.run(scenario())


def test_the_scheduler_admits_max_concurrent_per_replica():
    service = TextService(ReplicaSet([ScriptedEngine(HELLO)] * 3), EmbeddedModels(), Limits(max_concurrent=2))
    assert service.scheduler.capacity == 6
    single = TextService(ScriptedEngine(HELLO), EmbeddedModels(), Limits(max_concurrent=2))
    assert single.scheduler.capacity == 2 and len(single.engine) == 1  # one engine: a set of one


def test_a_bad_algorithm_or_an_empty_set_is_a_clear_error():
    with pytest.raises(ConfigError, match="'random' is unknown: expected one of least_loaded, round_robin"):
        ReplicaSet([ScriptedEngine(HELLO)], "random")
    with pytest.raises(ConfigError, match="at least one engine, got none"):
        ReplicaSet([])


def test_cluster_endpoints_show_each_replicas_load_on_a_live_server():
    a, b = held(), held()
    app = create_app(ReplicaSet([a, b]), EmbeddedModels(), version=__version__, max_concurrent=1)
    body = {"model": SMOL, "prompt": "Hi", "options": {"temperature": 0}}
    with (
        serving(app) as url,
        httpx.Client(base_url=url, timeout=HANG_S) as http,
        http.stream("POST", "/api/generate", json=body) as first,
        http.stream("POST", "/api/generate", json=body) as second,
    ):
        assert (first.status_code, second.status_code) == (200, 200)  # 1 slot per replica, 2 replicas
        status = http.get("/api/distributed/status").json()
        assert [(r["replica"], r["running"]) for r in status["replicas"]] == [(0, 1), (1, 1)]
        assert status["world_size"] == 2 and [r["replica"] for r in status["ranks"]] == [0, 1]
        assert status["admission"] == {"running": 2, "capacity": 2, "waiting": 0, "max_queue": 512}
        assert status["healthy"] is True
        nodes = http.get("/api/distributed/nodes").json()["nodes"]
        assert [(r["replica"], r["rank"]) for r in nodes[0]["ranks"]] == [(0, 0), (1, 0)]
        [model] = http.get("/api/distributed/models").json()["models"]
        assert model["replicas"] == 2 and model["parallelism"]["degree"] == 1
        for engine in (a, b):
            engine.release_from_thread()
        for stream in (first, second):
            assert json.loads(list(stream.iter_lines())[-1])["done"] is True
        metrics = http.get("/api/distributed/metrics").json()["replicas"]
        assert [(r["running"], r["requests_total"]) for r in metrics] == [(0, 1), (0, 1)]
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        totals = {s.labels["replica"]: s.value for s in families["tp_ollama_replica_requests"].samples}
        assert totals == {"0": 1.0, "1": 1.0}
        gauges = {s.labels["replica"]: s.value for s in families["tp_ollama_replica_requests_running"].samples}
        assert gauges == {"0": 0.0, "1": 0.0}


# --- `serve --replicas 2 --tp 1`: two real engine groups under one front end -----------------------------

STARTUP_S = 180


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path_factory.mktemp("models")), "OMP_NUM_THREADS": "1"}
    env.pop("OLLAMA_HOST", None)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as sink:  # a file, not a pipe nobody reads
        cmd = [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), "--replicas", "2", "--tp", "1"]
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def loaded() -> bool:  # a separate process: the model loading on both replicas is the readiness signal
        try:
            with ollama.Client(host=url, timeout=STARTUP_S) as client:
                assert client.generate(model=SMOL, prompt="").done_reason == "load"
            return True
        except (httpx.TransportError, ConnectionError):
            assert proc.poll() is None, log.read_text()
            return False

    wait_until(loaded, STARTUP_S, what="the server loading the model on both replicas")
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    print(log.read_text()[-4000:])


@pytest.mark.slow
def test_serve_replicas_2_routes_two_concurrent_requests_to_different_groups(two_replicas):
    url, _ = two_replicas
    status = httpx.get(f"{url}/api/distributed/status").json()
    assert [r["replica"] for r in status["replicas"]] == [0, 1] and status["world_size"] == 2
    assert status["healthy"] is True and status["model"] == SMOL
    pids = {r["replica"]: r["pid"] for r in status["ranks"]}
    assert sorted(pids) == [0, 1] and pids[0] != pids[1]  # two groups, each its own rank process
    # Greedy counting goes on far past the time the second request needs to start.
    body = {"model": SMOL, "prompt": "1, 2, 3, 4, 5,", "raw": True, "options": {"temperature": 0, "num_predict": 2000}}
    with (
        httpx.Client(base_url=url, timeout=HANG_S) as http,
        http.stream("POST", "/api/generate", json=body) as first,
        http.stream("POST", "/api/generate", json=body) as second,
    ):
        lines = [stream.iter_lines() for stream in (first, second)]  # kept: a dropped one closes its stream
        for line in lines:
            assert json.loads(next(line))["done"] is False  # both are generating
        during = http.get("/api/distributed/status").json()["replicas"]
        assert [(r["running"], r["requests_total"]) for r in during] == [(1, 1), (1, 1)]
    # Both closed early: each replica's request ends (cancelled) and its count drops.
    wait_until(
        lambda: not any(r["running"] for r in httpx.get(f"{url}/api/distributed/metrics").json()["replicas"]),
        what="no replica counting a request whose client left",
    )


@pytest.mark.slow
def test_sigint_stops_the_front_end_and_every_replicas_processes(two_replicas):
    _, proc = two_replicas
    children = psutil.Process(proc.pid).children(recursive=True)
    engines = [p for p in children if "engine" in " ".join(p.cmdline())]
    assert len(engines) >= 2  # one host per replica (its ranks are among `children` too)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) is not None
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []
