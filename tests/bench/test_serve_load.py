"""bench/serve_load.py's statistics, wire parsing and report, without servers: records are built by hand
and streamed replies come from httpx.MockTransport."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"


def _load() -> ModuleType:
    # bench/ is scripts, not a package: import the file itself (registered first, for its dataclasses).
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sl = _load()

RESULT_KEYS = {
    "target", "concurrency", "wall_s", "requests", "ok", "errors", "timeouts", "generated_tokens", "tok_s",
    "tokens_per_request", "stopped_early", "ttft_s", "itl_s", "request_s", "error_samples", "records",
}  # fmt: skip
RECORD_KEYS = {"worker", "prompt", "start_s", "end_s", "ttft_s", "tokens", "chunks", "stop", "error", "timed_out"}


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n: int) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 50, 99, 100):
        assert sl.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none() -> None:
    assert sl.percentile([], 50) is None
    assert sl.distribution([]) == {"p50": None, "p99": None, "mean": None, "n": 0}


def test_percentile_is_order_independent() -> None:
    assert sl.percentile([5.0, 1.0, 3.0], 50) == 3.0


def test_summarize_counts_failures_and_aggregates_only_ok_requests() -> None:
    records = [
        sl.Record(worker=0, prompt=0, start_s=0.0, end_s=2.0, ttft_s=0.5, tokens=64, chunks=64, stop="length",
                  gaps_s=[0.1, 0.3]),
        sl.Record(worker=1, prompt=1, start_s=0.0, end_s=4.0, ttft_s=1.5, tokens=32, chunks=32, stop="stop",
                  gaps_s=[0.2]),
        sl.Record(worker=0, prompt=2, start_s=2.0, end_s=2.1, error="HTTP 503: busy"),
        sl.Record(worker=1, prompt=3, start_s=4.0, end_s=9.0, ttft_s=0.2, chunks=3, timed_out=True, gaps_s=[9.0]),
    ]  # fmt: skip
    r = sl.summarize("llama.cpp", 2, records, wall_s=8.0, num_predict=64)
    assert set(r) == RESULT_KEYS
    assert (r["requests"], r["ok"], r["errors"], r["timeouts"]) == (4, 2, 1, 1)
    assert r["requests"] == r["ok"] + r["errors"] + r["timeouts"]
    assert r["generated_tokens"] == 96
    assert r["tok_s"] == pytest.approx(96 / 8.0)
    assert r["tokens_per_request"] == {"min": 32, "max": 64, "mean": 48.0}
    assert r["stopped_early"] == 1
    assert r["ttft_s"]["p50"] == pytest.approx(1.0)  # the timed-out request's 0.2 s is not among them
    assert r["ttft_s"]["n"] == 2
    assert r["itl_s"]["n"] == 3 and r["itl_s"]["p50"] == pytest.approx(0.2)
    assert r["request_s"]["mean"] == pytest.approx(3.0)
    assert r["error_samples"] == ["HTTP 503: busy"]
    assert len(r["records"]) == 4 and all(set(rec) == RECORD_KEYS for rec in r["records"])
    json.dumps(r)  # the report is plain JSON


def test_summarize_with_no_successful_request() -> None:
    r = sl.summarize("tp-ollama", 1, [sl.Record(worker=0, prompt=0, start_s=0.0, timed_out=True)], 0.0, 64)
    assert (r["ok"], r["timeouts"], r["tok_s"], r["tokens_per_request"]["mean"]) == (0, 1, 0.0, 0.0)
    assert r["ttft_s"]["p50"] is None
    assert "| tp-ollama | 1 | 1 | 0 | 0 | 1 | 0.0 | 0.0 | - | - | - | - |" in sl.markdown_table([r])


def test_markdown_table_has_one_row_per_result() -> None:
    rec = sl.Record(worker=0, prompt=0, start_s=0.0, end_s=1.0, ttft_s=0.25, tokens=64, chunks=64, gaps_s=[0.0125])
    results = [sl.summarize(t, c, [rec], 1.0, 64) for c in (1, 4) for t in ("tp-ollama", "llama.cpp")]
    lines = sl.markdown_table(results).splitlines()
    assert len(lines) == 2 + 4
    assert lines[2] == "| tp-ollama | 1 | 1 | 1 | 0 | 0 | 64.0 | 64.0 | 250 | 250 | 12 | 12 |"


def test_ollama_lines() -> None:
    t = sl.OllamaTarget("gemma3:270m")
    assert t.parse('{"response": "Hi", "done": false}') == sl.Chunk(carries_token=True)
    assert t.parse('{"response": "", "done": false}') == sl.Chunk(carries_token=False)
    assert t.parse('{"response": "", "done": true, "eval_count": 64, "done_reason": "length"}') == sl.Chunk(
        final=True, tokens=64, stop="length"
    )
    assert t.parse('{"error": "boom"}') == sl.Chunk(error="boom")
    assert t.parse("") is None
    body = t.body("p", 64, 7)
    assert body["raw"] and body["stream"] and body["options"] == {"temperature": 0, "seed": 7, "num_predict": 64}


def test_llama_lines() -> None:
    t = sl.LlamaTarget()
    assert t.parse('data: {"content": " a", "stop": false, "tokens_predicted": 1}') == sl.Chunk(carries_token=True)
    final = 'data: {"content": "", "stop": true, "tokens_predicted": 64, "stop_type": "limit"}'
    assert t.parse(final) == sl.Chunk(final=True, tokens=64, stop="limit")
    assert t.parse('data: {"error": {"code": 500, "message": "x"}}').error is not None
    assert t.parse("") is None and t.parse(": ping") is None
    body = t.body("p", 64, 7)
    assert body["ignore_eos"] and body["n_predict"] == 64 and not body["cache_prompt"]


def _request(handler: httpx.MockTransport, target: Any) -> Any:
    record = sl.Record(worker=0, prompt=0, start_s=0.0)

    async def go() -> None:
        async with httpx.AsyncClient(transport=handler) as client:
            await sl.one_request(client, "http://x", target, record, {}, 10.0, 0.0)

    asyncio.run(go())
    return record


def _ndjson(*chunks: dict) -> bytes:
    return b"".join(json.dumps(c).encode() + b"\n" for c in chunks)


def test_one_request_records_tokens_and_gaps() -> None:
    body = _ndjson(
        {"response": "a", "done": False},
        {"response": "b", "done": False},
        {"response": "c", "done": False},
        {"response": "", "done": True, "eval_count": 3, "done_reason": "length"},
    )
    r = _request(httpx.MockTransport(lambda req: httpx.Response(200, content=body)), sl.OllamaTarget("m"))
    assert r.ok and (r.tokens, r.chunks, r.stop, len(r.gaps_s)) == (3, 3, "length", 2)
    assert r.ttft_s is not None and r.end_s > 0


def test_one_request_counts_http_errors_and_cut_streams() -> None:
    refused = _request(httpx.MockTransport(lambda req: httpx.Response(503, content=b"busy")), sl.OllamaTarget("m"))
    assert not refused.ok and refused.error == "HTTP 503: busy"
    cut = _ndjson({"response": "a", "done": False})
    short = _request(httpx.MockTransport(lambda req: httpx.Response(200, content=cut)), sl.OllamaTarget("m"))
    assert short.error == "stream ended without its final chunk" and not short.timed_out


def test_one_request_counts_timeouts() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    r = _request(httpx.MockTransport(slow), sl.LlamaTarget())
    assert r.timed_out and r.error is None and not r.ok
