"""tp_ollama.bench.serve: load against a real tp-ollama server (the app and in-process engine on a loopback
port, serving a tiny random GGUF) through two wire formats, and failure counting against a small test
double server whose replies break on purpose."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tests.local_engine import LocalEngine
from tests.server.conftest import serving
from tests.server.doubles import EmbeddedModel, EmbeddedModels
from tests.tiny import write_chat_gguf
from tests.waits import HANG_S
from tp_ollama import __version__
from tp_ollama.bench import report
from tp_ollama.bench import schema as bench_schema
from tp_ollama.bench.serve import LevelResult, load_prompts, run_level, run_serve
from tp_ollama.bench.serve_targets import ServeTarget, parse_target
from tp_ollama.errors import ConfigError, TpOllamaError
from tp_ollama.launch import free_port
from tp_ollama.server.app import create_app

TINY = "tiny-bench:latest"
NUM_PREDICT = 8


class ClosingEngine:
    """The app, with its engine closed once the app has shut down, on the server's own event loop (the one
    the engine's connection belongs to), so that the engine thread is joined before the test ends."""

    def __init__(self, app: Starlette, engine: LocalEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_then_close(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.engine.close()
            await send(message)

        await self.app(scope, receive, send_then_close)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tp-ollama's own app and engine on a free loopback port, serving a tiny random checkpoint."""
    path = write_chat_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    # The engine thread shares this process with the server and the load generator: OpenMP threads spinning
    # for cores the other threads hold make a token cost ~100x more (what OMP_NUM_THREADS=1 avoids for `serve`).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = LocalEngine()
    models = EmbeddedModels({TINY: EmbeddedModel(TINY, path)})
    app = ClosingEngine(create_app(engine, models, version=__version__), engine)
    try:
        with serving(app) as url:  # type: ignore[arg-type]  # any ASGI app serves
            yield url
    finally:
        torch.set_num_threads(threads)
    assert not engine._thread.is_alive()


# ---- a test double: a server that breaks on purpose, chosen by the model name ------------------


async def _generate(request: Request) -> Response:
    body = await request.json()
    behaviour = body["model"]
    if behaviour == "http500":
        return Response("engine on fire", status_code=500)

    async def lines() -> AsyncIterator[bytes]:
        yield json.dumps({"response": "Hello", "done": False}).encode() + b"\n"
        if behaviour == "error":
            yield json.dumps({"error": "boom mid-stream"}).encode() + b"\n"
        elif behaviour == "stall":
            await asyncio.Event().wait()  # never set: only the client's timeout ends this request
        elif behaviour == "truncated":
            return  # the connection closes without the final `done` line

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def _completion(request: Request) -> Response:
    """llama-server's /completion as it streams: SSE events, the last with `stop` and its token count."""
    n = (await request.json())["n_predict"]

    async def events() -> AsyncIterator[bytes]:
        for _ in range(n - 1):
            yield b'data: {"content": "a", "stop": false}\n\n'
        yield f'data: {{"content": "b", "stop": true, "tokens_predicted": {n}, "stop_type": "limit"}}\n\n'.encode()

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def double() -> Iterator[str]:
    app = Starlette(routes=[Route("/api/generate", _generate, methods=["POST"]),
                            Route("/completion", _completion, methods=["POST"])])  # fmt: skip
    with serving(app) as url:
        yield url


def level(
    url: str, behaviour: str, concurrency: int = 2, duration_s: float = 0.2, timeout_s: float = 10.0
) -> LevelResult:
    target = ServeTarget("double", "ollama", url, behaviour)
    # A level that has not ended by HANG_S has hung (a stalled request its timeout did not end, say).
    return asyncio.run(asyncio.wait_for(run_level(target, concurrency, duration_s, 8, ["hi"], 0, timeout_s), HANG_S))


# ---- against the real server ---------------------------------------------------------------------


def test_serve_report_of_a_real_server(tiny_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    targets = [parse_target(f"ollama={tiny_server}", TINY), parse_target(f"v1@openai={tiny_server}/", TINY)]
    out = run_serve(targets, [1, 2], duration_s=1.0, num_predict=NUM_PREDICT, request_timeout_s=60, argv=["x"])
    bench_schema.validate(out)
    assert out["kind"] == "serve"
    # For each concurrency, each target in turn.
    assert [(r["target"], r["config"]["concurrency"]) for r in out["results"]] == [
        ("ollama", 1), ("v1", 1), ("ollama", 2), ("v1", 2),
    ]  # fmt: skip
    for r in out["results"]:
        assert r["config"] == {"concurrency": r["config"]["concurrency"], "num_predict": NUM_PREDICT, "model": TINY}
        assert r["aggregate_tok_s"] > 0
        assert r["requests"]["ok"] >= r["config"]["concurrency"], r
        assert r["requests"]["errors"] == r["requests"]["timeouts"] == 0, r["error_samples"]
        assert r["ttft_s"]["n"] == r["requests"]["ok"] and r["ttft_s"]["p50"] > 0
        assert r["request_s"]["p50"] >= r["ttft_s"]["p50"]
        assert 0 < r["extra"]["generated_tokens"] <= NUM_PREDICT * r["requests"]["ok"]
        assert r["aggregate_tok_s"] == pytest.approx(r["extra"]["generated_tokens"] / r["extra"]["wall_s"])
    assert capsys.readouterr().err.count("[") == 4  # one progress step per level (plain lines: not a TTY)


def test_an_unreachable_target_fails_naming_its_url(tiny_server: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    targets = [parse_target(f"ollama={tiny_server}", TINY), parse_target(f"gone@ollama={closed}", TINY)]
    with pytest.raises(TpOllamaError, match=f"'gone' at {closed}/api/generate"):
        run_serve(targets, [1], duration_s=1.0, num_predict=NUM_PREDICT, request_timeout_s=30, progress=False)


# ---- failures are counted, never dropped or mixed into the aggregate -----------------------------


def test_an_error_mid_stream_counts_as_an_error(double: str) -> None:
    result = level(double, "error")
    metrics = result.metrics()
    assert len(result.records) >= 2
    assert metrics["requests"] == {"ok": 0, "errors": len(result.records), "timeouts": 0}
    assert metrics["aggregate_tok_s"] == 0 and metrics["ttft_s"]["n"] == 0
    assert metrics["error_samples"] == ["error in stream: boom mid-stream"]


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [("http500", "HTTP 500: engine on fire"), ("truncated", "stream ended without its final chunk")],
)
def test_broken_replies_count_as_errors(double: str, behaviour: str, message: str) -> None:
    metrics = level(double, behaviour).metrics()
    assert metrics["requests"]["ok"] == 0 and metrics["requests"]["errors"] > 0
    assert metrics["error_samples"] == [message]


def test_a_request_past_the_timeout_counts_as_a_timeout(double: str) -> None:
    result = level(double, "stall", concurrency=2, duration_s=0.05, timeout_s=0.5)
    out = report.new_report("serve", {}, argv=[])
    report.add_result(out, "double", {"concurrency": 2}, **result.metrics())
    bench_schema.validate(out)
    assert out["results"][0]["requests"] == {"ok": 0, "errors": 0, "timeouts": 2}
    # The stall never ends on its own: the timeout ended each request, and not before it was due.
    assert all(r.end_s - r.start_s >= 0.5 for r in result.records)


def test_llamacpp_wire_counts_the_servers_tokens(double: str) -> None:
    target = parse_target(f"llamacpp={double}", "")
    result = asyncio.run(run_level(target, 1, 0.05, 5, ["hi"], 0, 10.0))
    assert result.records and all(r.ok and r.tokens == 5 and r.chunks == 5 for r in result.records)
    assert all(r.stop == "limit" and len(r.gaps_s) == 4 for r in result.records)
    assert result.extra()["stopped_early"] == 0


# ---- settings --------------------------------------------------------------------------------------


def test_bad_run_settings_are_refused_before_any_request() -> None:
    twice = [parse_target("ollama=http://a:1", "m"), parse_target("ollama=http://b:2", "m")]
    with pytest.raises(ConfigError, match="repeat: name them apart"):
        run_serve(twice, [1], 1.0, 8, progress=False)
    with pytest.raises(ConfigError, match=r"concurrency \[1, 0\] is invalid"):
        run_serve(twice[:1], [1, 0], 1.0, 8, progress=False)


def test_prompt_files(tmp_path: Path) -> None:
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(["one\nwith a newline", "two"]))
    assert load_prompts(lines) == ["first prompt", "second prompt"]
    assert load_prompts(listed) == ["one\nwith a newline", "two"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(empty)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text('["unterminated')
    with pytest.raises(ConfigError, match="not"):
        load_prompts(tmp_path / "bad.json")
