"""Keep-alive, model switching and errors after a stream started, with a scripted engine (in process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.server.doubles import EmbeddedModel, EmbeddedModels, ScriptedEngine
from tp_ollama import __version__
from tp_ollama.errors import RequestError
from tp_ollama.server.app import create_app
from tp_ollama.server.text import Limits, Scheduler

HELLO = [19556, 905]  # SmolLM2 ids of "Hello world"


def test_checklist_24_error_after_streaming_started_is_a_final_ndjson_line():
    engine = ScriptedEngine(HELLO, fail_with=RequestError("the engine fell over"))
    app = create_app(engine, EmbeddedModels(), version=__version__)
    with TestClient(app, base_url="http://localhost") as client:  # the Host guard refuses "testserver"
        response = client.post(
            "/api/generate", json={"model": "smollm2:135m", "prompt": "Hi", "options": {"temperature": 0}}
        )
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert "".join(line.get("response", "") for line in lines) == "Hello world"
        assert lines[-1] == {"error": "the engine fell over"}
        sse = client.post(
            "/v1/chat/completions",
            json={"model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        last = sse.text.strip().split("\n\n")[-1]
        assert json.loads(last.removeprefix("data: "))["error"]["message"] == "the engine fell over"


@pytest.fixture
def models() -> Iterator[EmbeddedModels]:
    yield EmbeddedModels()


def test_keep_alive_timer_unloads_an_idle_model(models):
    async def scenario() -> None:
        engine = ScriptedEngine(HELLO)
        scheduler = Scheduler(engine, Limits(keep_alive_s=300))
        resolved = models.resolve("smollm2:135m")
        lease = await scheduler.acquire("smollm2:135m", resolved, 4096, keep_alive=0.01)
        assert engine.loaded() is not None and scheduler.running()[0]["name"] == "smollm2:135m"
        lease.release()
        await asyncio.wait_for(engine.unloaded.wait(), timeout=10)
        assert scheduler.running() == []

    asyncio.run(scenario())


def test_a_new_request_resets_the_timer_and_forever_never_expires(models):
    async def scenario() -> None:
        engine = ScriptedEngine(HELLO)
        scheduler = Scheduler(engine, Limits())
        resolved = models.resolve("smollm2:135m")
        (await scheduler.acquire("s", resolved, 4096, keep_alive=-1)).release()
        (entry,) = scheduler.running()
        assert entry["expires_at"][:4] > "2200"  # "forever" is far in the future, as upstream
        assert not engine.unloaded.is_set()
        scheduler.close()

    asyncio.run(scenario())


def test_another_model_waits_for_the_current_ones_requests(models):
    async def scenario() -> None:
        engine = ScriptedEngine(HELLO)
        scheduler = Scheduler(engine, Limits())
        smol = models.resolve("smollm2:135m")
        gemma = EmbeddedModel("other:latest", Path("/models/other.gguf"))  # never read: the engine is scripted
        first = await scheduler.acquire("smol", smol, 4096, None)
        switching = asyncio.create_task(scheduler.acquire("gemma", gemma, 4096, None))
        await asyncio.sleep(0)  # one turn of the loop: the task runs until it waits for the first request
        assert not switching.done() and engine.loads == [smol.path]
        first.release()
        second = await asyncio.wait_for(switching, timeout=10)
        assert engine.loads == [smol.path, gemma.path]
        second.release()
        scheduler.close()

    asyncio.run(scenario())
