"""Admission (admission.Scheduler): up to max_concurrent requests hold the model at once, up to max_queue
wait in FIFO order, one more is refused with upstream's 503; a waiter whose client leaves gives its
place back. The scheduler on its own, then a live server driven by the official clients. The engine is
the scripted double: a real one cannot be made to keep requests running on demand."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.server.conftest import SMOL, serving
from tests.server.doubles import EmbeddedModel, EmbeddedModels, ScriptedEngine
from tp_ollama import __version__
from tp_ollama.errors import EngineUnavailable, ServerBusy
from tp_ollama.server.admission import Lease, Limits, Scheduler
from tp_ollama.server.app import create_app

HELLO = [19556, 905]  # SmolLM2 ids of "Hello world"
BUSY = "server busy, please try again.  maximum pending requests exceeded"  # upstream's, two spaces
WAIT_S = 60


@pytest.fixture
def models() -> Iterator[EmbeddedModels]:
    yield EmbeddedModels()


# --- the scheduler ---------------------------------------------------------------------------------


def test_a_wait_past_inference_timeout_is_a_503_that_says_so_and_frees_its_place(models):
    async def scenario() -> None:
        engine = ScriptedEngine(HELLO)
        scheduler = Scheduler(engine, Limits(max_concurrent=1, max_queue=3, timeout_s=0.2))
        smol = models.resolve(SMOL)
        first = await scheduler.acquire(SMOL, smol, 4096, None)
        started = time.monotonic()
        expected = r"timed out after 0\.2 s waiting for model '.*' .*inference\.timeout"
        with pytest.raises(EngineUnavailable, match=expected):
            await scheduler.acquire(SMOL, smol, 4096, None)
        assert time.monotonic() - started < WAIT_S
        assert (scheduler.active, scheduler.waiting) == (1, 0)  # the timed-out request left the queue
        first.release()
        second = await asyncio.wait_for(scheduler.acquire(SMOL, smol, 4096, None), WAIT_S)
        assert scheduler.active == 1  # the lock was given back: later requests still get in
        second.release()
        scheduler.close()

    asyncio.run(scenario())


def test_requests_for_the_loaded_model_run_together_and_the_queue_is_fifo(models):
    async def scenario() -> None:
        engine = ScriptedEngine(HELLO)
        scheduler = Scheduler(engine, Limits(max_concurrent=2, max_queue=3))
        smol = models.resolve(SMOL)

        def acquire() -> asyncio.Task[Lease]:
            return asyncio.create_task(scheduler.acquire(SMOL, smol, 4096, None))

        first, second = await acquire(), await acquire()  # two slots: both hold the model at once
        assert (scheduler.active, scheduler.waiting, engine.loads) == (2, 0, [smol.path])
        w1, w2, w3 = acquire(), acquire(), acquire()
        await asyncio.sleep(0)  # one turn of the loop: each task runs until it waits
        assert scheduler.waiting == 3
        with pytest.raises(ServerBusy, match=f"^{re.escape(BUSY)}$"):
            await scheduler.acquire(SMOL, smol, 4096, None)
        assert scheduler.waiting == 3  # the refused request never queued
        first.release()
        third = await asyncio.wait_for(w1, WAIT_S)  # the first waiter gets the freed slot
        assert not w2.done() and not w3.done() and scheduler.waiting == 2
        w3.cancel()  # a waiter behind the head leaves
        await asyncio.gather(w3, return_exceptions=True)
        w4 = acquire()
        await asyncio.sleep(0)
        assert scheduler.waiting == 2
        w2.cancel()  # the head of the queue leaves: the next one takes its turn
        await asyncio.gather(w2, return_exceptions=True)
        assert scheduler.waiting == 1
        second.release()
        fourth = await asyncio.wait_for(w4, WAIT_S)
        assert (scheduler.active, scheduler.waiting) == (2, 0)
        for lease in (third, fourth):
            lease.release()
        assert scheduler.active == 0 and engine.loads == [smol.path]
        scheduler.close()

    asyncio.run(scenario())


def test_a_model_switch_waits_for_the_running_requests_and_holds_back_those_behind_it(models):
    async def scenario() -> None:
        engine = ScriptedEngine(HELLO)
        scheduler = Scheduler(engine, Limits(max_concurrent=2))
        smol = models.resolve(SMOL)
        other = EmbeddedModel("other:latest", Path("/models/other.gguf"))  # never read: the engine is scripted
        running = await scheduler.acquire("smol", smol, 4096, None)
        switching = asyncio.create_task(scheduler.acquire("other", other, 4096, None))
        # A slot for smol is free, but it arrived after the switch: FIFO keeps it behind, so the switch
        # cannot be starved by a stream of requests for the loaded model.
        behind = asyncio.create_task(scheduler.acquire("smol", smol, 4096, None))
        await asyncio.sleep(0)
        assert not switching.done() and not behind.done() and engine.loads == [smol.path]
        assert (scheduler.active, scheduler.waiting) == (1, 2)
        running.release()
        switched = await asyncio.wait_for(switching, WAIT_S)
        assert engine.loads == [smol.path, other.path] and not behind.done()
        switched.release()
        back = await asyncio.wait_for(behind, WAIT_S)
        assert engine.loads == [smol.path, other.path, smol.path]
        back.release()
        scheduler.close()

    asyncio.run(scenario())


def test_limits_refuse_zero_slots_or_queue():
    with pytest.raises(ValueError, match="max_concurrent = 0 and max_queue = 512: expected both >= 1"):
        Limits(max_concurrent=0)


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


# --- a live server -----------------------------------------------------------------------------------


def generate_body(prompt: str) -> dict[str, Any]:
    return {"model": SMOL, "prompt": prompt, "options": {"temperature": 0}}


def counts(http: httpx.Client) -> tuple[int, int]:
    """(running, waiting) as the Monitor reports them."""
    requests = http.get("/api/distributed/metrics").json()["requests"]
    return requests["running"], requests["waiting"]


def until(check: Callable[[], bool], what: str) -> None:
    """Ask again until `check` holds: the server learns of arrivals and disconnects on its own time."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what


def streamed_text(url: str, prompt: str) -> str:
    """A whole streamed /api/generate, in this thread: its text."""
    with (
        httpx.Client(base_url=url, timeout=WAIT_S) as client,
        client.stream("POST", "/api/generate", json=generate_body(prompt)) as reply,
    ):
        assert reply.status_code == 200
        lines = [json.loads(line) for line in reply.iter_lines()]
    assert lines[-1]["done"] is True
    return "".join(line["response"] for line in lines)


def raw_post(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a bare socket and return the socket unread: closing it is a client leaving."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_checklist_24_past_the_queue_limit_a_request_gets_503_server_busy_and_waiters_run_in_turn():
    engine = ScriptedEngine(HELLO)
    engine.hold = True  # requests that reach the engine stay running until released
    app = create_app(engine, EmbeddedModels(), version=__version__, max_concurrent=2, max_queue=2)
    scheduler = app.state.service.scheduler
    with (
        serving(app) as url,
        httpx.Client(base_url=url, timeout=WAIT_S) as http,
        ThreadPoolExecutor(max_workers=2) as pool,
        ExitStack() as running,
    ):
        # Two run: each gets its 200 once admitted, then waits in the engine.
        first = running.enter_context(http.stream("POST", "/api/generate", json=generate_body("one")))
        second = running.enter_context(http.stream("POST", "/api/generate", json=generate_body("two")))
        assert (first.status_code, second.status_code) == (200, 200)
        assert counts(http) == (2, 0)
        # Two wait: one in a thread, one on a bare socket that will leave.
        third = pool.submit(streamed_text, url, "three")
        until(lambda: counts(http) == (2, 1), "the third request did not queue")
        leaving = raw_post(url, "/api/generate", generate_body("four"))
        until(lambda: counts(http) == (2, 2), "the fourth request did not queue")
        assert scheduler.waiting == 2

        # The fifth, through either client and on every route that uses the model: 503, upstream's words.
        with ollama.Client(host=url) as client:
            with pytest.raises(ollama.ResponseError) as refused:
                next(iter(client.generate(model=SMOL, prompt="five", stream=True)))
            assert (refused.value.status_code, refused.value.error) == (503, BUSY)
            with pytest.raises(ollama.ResponseError) as refused:
                client.embed(model=SMOL, input="five")  # embeddings pass the same admission
            assert (refused.value.status_code, refused.value.error) == (503, BUSY)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="ollama", max_retries=0) as oai:
            with pytest.raises(openai.APIStatusError) as shaped:
                oai.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "five"}], stream=True)
        assert shaped.value.status_code == 503
        assert shaped.value.body == {"message": BUSY, "type": "api_error", "param": None, "code": None}
        assert counts(http) == (2, 2) and scheduler.waiting == 2  # refusals take no place

        # The client on the socket leaves: its place is free, and a new request may take it.
        leaving.close()
        until(lambda: counts(http) == (2, 1), "the request whose client left is still waiting")
        assert scheduler.waiting == 1
        sixth = pool.submit(streamed_text, url, "six")
        until(lambda: counts(http) == (2, 2), "the sixth request did not queue")

        # The running ones finish; the waiting ones run in turn and finish too.
        engine.release_from_thread()
        for stream in (first, second):
            lines = [json.loads(line) for line in stream.iter_lines()]
            assert "".join(line["response"] for line in lines) == "Hello world" and lines[-1]["done"] is True
        assert third.result(timeout=WAIT_S) == sixth.result(timeout=WAIT_S) == "Hello world"
        until(lambda: counts(http) == (0, 0), "requests are still listed")
        assert (scheduler.active, scheduler.waiting) == (0, 0)
        assert len(engine.prompts) == 4  # the four admitted requests reached the engine, and no other
        served = http.get("/api/distributed/metrics").json()["requests"]
        assert served["cancelled"] == 1 and served["success"] == 4 and served["error"] == 3  # three refusals
