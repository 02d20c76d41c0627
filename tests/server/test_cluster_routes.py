"""The /api/distributed/* endpoints: on the live server (one rank, LocalEngine) and, for a group of
several ranks on several hosts, over a scripted engine that reports such a group."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from tests.server.conftest import SMOL, LiveServer
from tests.server.doubles import EmbeddedModels, ScriptedEngine
from tp_ollama import __version__
from tp_ollama.errors import EngineUnavailable
from tp_ollama.parallel.layout import TPLayout
from tp_ollama.server.app import create_app
from tp_ollama.server.engine_api import LoadedModel, LoadRequest

GREEDY = {"temperature": 0, "seed": 1}
ROUTES = ("status", "nodes", "models", "metrics", "requests")
GiB = 1 << 30


@pytest.fixture
def other(server: LiveServer) -> Iterator[httpx.Client]:
    """A second client, for looking while `http` streams."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def load(http: httpx.Client) -> None:
    reply = http.post("/api/generate", json={"model": SMOL, "prompt": "", "stream": False})
    assert reply.status_code == 200 and reply.json()["done_reason"] == "load"


# --- the live server: one rank ---------------------------------------------------------------------


def test_status_reports_one_healthy_rank_and_the_loaded_model(http):
    load(http)
    status = http.get("/api/distributed/status").json()
    assert status["ranks"] == [
        {"rank": 0, "replica": 0, "host": socket.gethostname(), "pid": os.getpid(), "device": "cpu", "alive": True}
    ]
    # One engine group: one replica, with its load.
    [replica] = status["replicas"]
    assert replica["replica"] == 0 and replica["running"] == 0 and replica["alive"] is True
    assert status["world_size"] == 1 and status["nodes"] == 1 and status["healthy"] is True
    assert status["version"] == __version__ and status["uptime_seconds"] > 0
    assert status["model"] == SMOL


def test_nodes_report_host_and_rank_memory(http):
    load(http)
    reply = http.get("/api/distributed/nodes").json()
    assert reply["world_size"] == 1
    [node] = reply["nodes"]
    assert node["host"] == socket.gethostname() and node["device"] == "cpu"
    memory = node["memory"]
    assert memory["total_bytes"] > memory["free_bytes"] > 0 and memory["used_bytes"] > 0
    assert memory["used_bytes"] + memory["free_bytes"] == memory["total_bytes"]
    [rank] = node["ranks"]
    assert rank["rank"] == 0 and rank["pid"] == os.getpid() and rank["alive"] is True
    # The whole model lives in this process, so its resident memory is at least a good part of it.
    size = http.get("/api/distributed/models").json()["models"][0]["size"]
    assert rank["memory"]["rss_bytes"] > size // 2
    assert rank["share"] is not None


def test_models_describe_the_loaded_model_and_its_split(http, server):
    http.post("/api/generate", json={"model": SMOL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}})
    [model] = http.get("/api/distributed/models").json()["models"]
    loaded = server.engine.loaded()
    assert loaded is not None
    assert model["name"] == SMOL and model["path"] == str(loaded.path) and model["format"] == "gguf"
    assert model["dtype"] == loaded.dtype and model["num_ctx"] == loaded.num_ctx and model["size"] == loaded.size_bytes
    assert model["size"] > 90_000_000  # smollm2:135m packed: 4-bit layers, an int8 embedding
    assert model["parallelism"] == {"strategy": "tensor", "degree": 1, "weights": [1.0]}
    assert [(r["rank"], r["host"], r["device"]) for r in model["layout"]] == [(0, socket.gethostname(), "cpu")]


def test_models_is_empty_once_the_model_is_unloaded(http):
    load(http)
    reply = http.post("/api/generate", json={"model": SMOL, "prompt": "", "keep_alive": 0, "stream": False})
    assert reply.json()["done_reason"] == "unload"
    assert http.get("/api/distributed/models").json() == {"models": [], "sent": []}
    assert http.get("/api/distributed/status").json()["model"] is None
    load(http)


def test_requests_list_a_running_stream_with_a_growing_token_count(http, other):
    body = {"model": SMOL, "prompt": "Count from one to a thousand:", "options": {**GREEDY, "num_predict": 2000}}
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
        [first] = other.get("/api/distributed/requests").json()["requests"]
        assert first["endpoint"] == "/api/generate" and first["model"] == SMOL and first["state"] == "running"
        assert first["num_predict"] == 2000 and first["prompt_tokens"] > 0
        assert first["tokens_generated"] >= 1 and first["started_at"] <= time.time()
        # Every streamed line carries at least one token: having read more lines than the first count,
        # the count must have grown.
        read = 1
        while read <= first["tokens_generated"]:
            assert json.loads(next(lines))["done"] is False
            read += 1
        [later] = other.get("/api/distributed/requests").json()["requests"]
        assert later["id"] == first["id"] and later["tokens_generated"] > first["tokens_generated"]
        assert later["tokens_per_second"] > 0


def test_every_endpoint_answers_while_a_generation_runs(http, other):
    """No route waits for a running generation to end: each answer comes while the generation is still
    running, short of its num_predict."""
    body = {
        "model": SMOL,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "raw": True,
        "options": {**GREEDY, "num_predict": 2000},
    }
    with http.stream("POST", "/api/generate", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
        for route in ROUTES:
            reply = other.get(f"/api/distributed/{route}")
            assert reply.status_code == 200, (route, reply.text)
            [running] = other.get("/api/distributed/requests").json()["requests"]
            assert running["state"] == "running" and running["tokens_generated"] < 2000, (route, running)
        assert json.loads(next(lines))["done"] is False  # the generation went on meanwhile


# --- a scripted group of three ranks on two hosts -------------------------------------------------------

CONFIG = SimpleNamespace(
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152
)


class GroupEngine(ScriptedEngine):
    """A scripted engine that reports a TP group of three ranks, two on host "a" (one on a GPU), one
    on host "b"; `dead` ranks report alive False; `broken` makes cluster() raise."""

    def __init__(self) -> None:
        super().__init__([])
        self.dead: set[int] = set()
        self.broken = False

    async def load(self, request: LoadRequest) -> LoadedModel:
        layout = TPLayout.build(CONFIG, 3, [2.0, 1.0, 1.0]).describe()
        devices = ["cuda:0", "cpu", "cpu"]
        self._loaded = LoadedModel(
            request.path,
            request.dtype,
            request.num_ctx,
            world_size=3,
            layout=[{**entry, "device": devices[entry["rank"]]} for entry in layout],
            size_bytes=3 * GiB,
        )
        return self._loaded

    async def cluster(self) -> dict[str, Any]:
        if self.broken:
            raise EngineUnavailable("the engine closed its connection (a rank may have died)")
        ranks = []
        for rank, (host, device) in enumerate([("a", "cuda:0"), ("a", "cpu"), ("b", "cpu")]):
            on_gpu = device.startswith("cuda")
            ranks.append(
                {
                    "rank": rank,
                    "host": host,
                    "pid": 100 + rank,
                    "device": device,
                    "rss_bytes": (rank + 1) * GiB,
                    "mem_total_bytes": 64 * GiB if host == "a" else 32 * GiB,
                    "mem_available_bytes": 40 * GiB if host == "a" else 30 * GiB,
                    "device_mem_used_bytes": 2 * GiB if on_gpu else 0,
                    "device_mem_total_bytes": 80 * GiB if on_gpu else 0,
                    "alive": rank not in self.dead,
                }
            )
        return {"world_size": 3, "ranks": ranks, "as_of": time.time()}


@pytest.fixture
def group() -> Iterator[tuple[GroupEngine, TestClient]]:
    engine = GroupEngine()
    app = create_app(engine, EmbeddedModels(), version=__version__)
    with TestClient(app, base_url="http://localhost") as client:  # the Host guard refuses "testserver"
        load(client)  # type: ignore[arg-type]
        yield engine, client


def test_a_group_on_two_hosts_is_reported_per_host_with_each_ranks_share(group):
    _, client = group
    status = client.get("/api/distributed/status").json()
    assert status["world_size"] == 3 and status["nodes"] == 2 and status["healthy"] is True
    assert [(r["rank"], r["host"]) for r in status["ranks"]] == [(0, "a"), (1, "a"), (2, "b")]
    nodes = client.get("/api/distributed/nodes").json()["nodes"]
    assert [(n["host"], n["device"], [r["rank"] for r in n["ranks"]]) for n in nodes] == [
        ("a", "cpu,cuda", [0, 1]),
        ("b", "cpu", [2]),
    ]
    a, b = nodes
    assert a["memory"] == {
        "used_bytes": 24 * GiB,
        "free_bytes": 40 * GiB,
        "total_bytes": 64 * GiB,
        "device_used_bytes": 2 * GiB,
        "device_total_bytes": 80 * GiB,
    }
    assert b["memory"] == {"used_bytes": 2 * GiB, "free_bytes": 30 * GiB, "total_bytes": 32 * GiB}
    assert a["ranks"][0]["memory"] == {"rss_bytes": GiB, "device_used_bytes": 2 * GiB, "device_total_bytes": 80 * GiB}
    assert b["ranks"][0]["memory"] == {"rss_bytes": 3 * GiB}
    # Weights 2:1:1 over 9 heads (3 KV groups of 3), 1536 MLP rows (256-aligned) and 49152 vocab rows.
    share0, share2 = a["ranks"][0]["share"], b["ranks"][0]["share"]
    assert share0["attention_heads"] == {"start": 0, "end": 5, "count": 5}
    assert share0["kv_heads"] == {"start": 0, "end": 2, "count": 2}
    assert share0["mlp_columns"] == {"start": 0, "end": 768, "count": 768}
    assert share0["vocab_rows"]["count"] == 24576 and share0["weight"] == 2.0
    assert share2["attention_heads"] == {"start": 7, "end": 9, "count": 2}
    assert share2["vocab_rows"] == {"start": 36864, "end": 49152, "count": 12288}


def test_models_show_the_degree_weights_and_which_slice_lives_on_which_rank(group):
    _, client = group
    [model] = client.get("/api/distributed/models").json()["models"]
    assert model["name"] == SMOL and model["size"] == 3 * GiB
    assert model["parallelism"] == {"strategy": "tensor", "degree": 3, "weights": [2.0, 1.0, 1.0]}
    assert [(r["rank"], r["host"], r["device"]) for r in model["layout"]] == [
        (0, "a", "cuda:0"),
        (1, "a", "cpu"),
        (2, "b", "cpu"),
    ]
    heads = [(r["attention_heads"]["start"], r["attention_heads"]["end"]) for r in model["layout"]]
    assert heads == [(0, 5), (5, 7), (7, 9)]


def test_a_dead_rank_makes_the_group_unhealthy(group):
    engine, client = group
    engine.dead = {2}
    status = client.get("/api/distributed/status").json()
    assert status["healthy"] is False and [r["alive"] for r in status["ranks"]] == [True, True, False]


def test_an_engine_that_cannot_answer_is_unhealthy_on_status_and_503_elsewhere(group):
    engine, client = group
    engine.broken = True
    status = client.get("/api/distributed/status")
    assert status.status_code == 200
    body = status.json()
    assert body["healthy"] is False and body["ranks"] == [] and body["world_size"] == 3
    assert "closed its connection" in body["error"]
    nodes = client.get("/api/distributed/nodes")
    assert nodes.status_code == 503 and "closed its connection" in nodes.json()["error"]
    # The split is known without the engine's answer; only the hosts are not.
    [model] = client.get("/api/distributed/models").json()["models"]
    assert [r["host"] for r in model["layout"]] == [None, None, None]
