"""`tp-ollama bench serve`: HTTP load against any server that speaks one of three streamed completion
APIs, at several client concurrencies: aggregate tok/s, time to first token, inter-token latency.

Targets are `[NAME@]KIND=URL`; NAME labels the target in the report (default: KIND):

    ollama=http://127.0.0.1:11434      POST /api/generate, NDJSON, `done` on the last line (tp-ollama, Ollama)
    llamacpp=http://127.0.0.1:8080     POST /completion, SSE, `stop: true` on the last event (llama-server)
    openai=http://127.0.0.1:8000       POST /v1/completions, SSE `data:` lines ending in `data: [DONE]`

At each concurrency C, C client workers (asyncio + httpx, one process) send requests back to back for
`duration_s` (at least one request each), cycling through the prompts from a different starting prompt
each; requests in flight at the deadline run to the end and count, so a level's wall time is first send
to last reply. For each concurrency the targets take turns (A, B, A, B with rounds=2), so the machine's
drift hits all of them.

Every request is a raw completion, greedy (temperature 0, fixed seed), `num_predict` tokens. llama-server
gets `ignore_eos` and `cache_prompt: false`; the others cannot ignore EOS, so every level keeps its actual
token count and how many requests stopped early.

Measured at the client: TTFT is send to the first chunk that carries text; ITL samples are the gaps between
consecutive text-carrying chunks. Tokens per request are the server's own count (`eval_count`,
`tokens_predicted`, `usage.completion_tokens`), else the number of text chunks. A request that fails (HTTP
status, an error in the stream, a stream without its end, a transport error) counts in `errors`; one that
exceeds `request_timeout_s` in `timeouts`. Neither adds to the aggregate; none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tp_ollama.bench import report
from tp_ollama.bench.serve_targets import ServeTarget
from tp_ollama.errors import ConfigError, TpOllamaError

PROMPTS = (
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a list of twenty fruits in alphabetical order: apple, apricot, banana,",
    "Chapter 1\n\nThe rain had not stopped for three days, and the old lighthouse keeper",
    "The water cycle describes how water moves through the environment. First,",
    "def fibonacci(n):\n    # Return the first n Fibonacci numbers as a list\n",
    "Dear Sarah,\n\nI hope this letter finds you well. Since we last spoke,",
    "Ten tips for growing tomatoes at home:\n1.",
    "The city council met on Tuesday evening to discuss the new park, and residents",
    "In mathematics, a prime number is a natural number greater than 1 that",
    "The recipe for a simple bread needs flour, water, salt and yeast. Begin by",
    "Captain's log, day forty-two. The ship drifted east through the fog while",
)
CONNECT_TIMEOUT_S = 10.0
ERROR_SAMPLES = 5


def load_prompts(path: Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, or else one prompt per non-empty line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"prompt file {str(path)!r} cannot be read: {e.strerror or e}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompt file {str(path)!r} starts like JSON but is not: {e}") from None
        if not isinstance(data, list) or not all(isinstance(p, str) and p for p in data):
            raise ConfigError(f"prompt file {str(path)!r}: expected a JSON list of non-empty strings")
        prompts: list[str] = data
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {str(path)!r} holds no prompts: expected one per line or a JSON list")
    return prompts


# ---- one level of load --------------------------------------------------------------------------


@dataclass
class Record:
    """One request as the client saw it; times in seconds from the level's start."""

    worker: int
    prompt: int
    start_s: float
    end_s: float = 0.0
    ttft_s: float | None = None
    tokens: int = 0
    chunks: int = 0
    stop: str | None = None
    error: str | None = None
    timed_out: bool = False
    gaps_s: list[float] = field(default_factory=list)  # inter-token gaps

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


@dataclass
class LevelResult:
    """Every request of one (target, concurrency) level, and the level's wall time."""

    target: ServeTarget
    concurrency: int
    num_predict: int
    records: list[Record]
    wall_s: float
    loadavg: list[float] = field(default_factory=list)

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.records if r.ok]

    @property
    def generated_tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def aggregate_tok_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def metrics(self) -> dict[str, Any]:
        """The report Result's metric keys (Summaries in seconds, over ok requests only)."""
        ok = self.ok
        errors = [r for r in self.records if r.error is not None]
        return {
            "aggregate_tok_s": self.aggregate_tok_s,
            "ttft_s": report.summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
            "itl_s": report.summarize([g for r in ok for g in r.gaps_s]),
            "request_s": report.summarize([r.end_s - r.start_s for r in ok]),
            "requests": {"ok": len(ok), "errors": len(errors), "timeouts": sum(r.timed_out for r in self.records)},
            "error_samples": sorted({r.error for r in errors if r.error})[:ERROR_SAMPLES],
        }

    def extra(self) -> dict[str, Any]:
        tokens = [r.tokens for r in self.ok]
        return {
            "wall_s": self.wall_s,
            "generated_tokens": self.generated_tokens,
            "stopped_early": sum(t < self.num_predict for t in tokens),
            "tokens_per_request": {
                "min": min(tokens, default=0),
                "max": max(tokens, default=0),
                "mean": sum(tokens) / len(tokens) if tokens else 0.0,
            },
            "loadavg": self.loadavg,
        }


async def one_request(
    client: httpx.AsyncClient, target: ServeTarget, record: Record, body: dict[str, Any], timeout_s: float, t0: float
) -> None:
    """Fill `record` from one streamed request; never raises (a failure is the record's error)."""
    sent = time.perf_counter()
    last: float | None = None
    tokens: int | None = None
    ended = False
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", target.url + target.wire.route, json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")[:200]
                    record.error = f"HTTP {r.status_code}: {text}"
                    return
                async for line in r.aiter_lines():
                    chunk = target.wire.parse(line)
                    if chunk is None:
                        continue
                    if chunk.error is not None:
                        record.error = f"error in stream: {chunk.error[:200]}"
                        return
                    now = time.perf_counter()
                    if chunk.carries_token:
                        record.chunks += 1
                        if last is None:
                            record.ttft_s = now - sent
                        else:
                            record.gaps_s.append(now - last)
                        last = now
                    tokens = chunk.tokens if chunk.tokens is not None else tokens
                    record.stop = chunk.stop or record.stop
                    if chunk.final:
                        ended = True
                        break
        if not ended:
            record.error = "stream ended without its final chunk"
        else:
            record.tokens = tokens if tokens is not None else record.chunks
    except (TimeoutError, httpx.TimeoutException):
        record.timed_out = True
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError, TypeError) as e:
        # AttributeError/TypeError: a line that is JSON but not the shape the wire expects.
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.end_s = time.perf_counter() - t0


def _client(concurrency: int, request_timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env off: an HTTP(S)_PROXY in the environment must not route loopback benchmarks through a proxy.
    timeout = httpx.Timeout(request_timeout_s, connect=min(CONNECT_TIMEOUT_S, request_timeout_s))
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


async def run_level(
    target: ServeTarget,
    concurrency: int,
    duration_s: float,
    num_predict: int,
    prompts: Sequence[str],
    seed: int,
    request_timeout_s: float,
) -> LevelResult:
    """`concurrency` workers sending back to back for `duration_s`; in-flight requests finish and count."""
    if concurrency < 1:
        raise ConfigError(f"concurrency {concurrency} is invalid: expected at least 1")
    if not prompts:
        raise ConfigError("no prompts to send: expected at least one")
    records: list[Record] = []

    async def worker(w: int, client: httpx.AsyncClient, t0: float, deadline: float) -> None:
        i = w
        while i == w or time.perf_counter() < deadline:  # every worker sends at least one request
            p = i % len(prompts)
            record = Record(worker=w, prompt=p, start_s=time.perf_counter() - t0)
            records.append(record)
            body = target.wire.body(target.model, prompts[p], num_predict, seed)
            await one_request(client, target, record, body, request_timeout_s, t0)
            i += 1

    async with _client(concurrency, request_timeout_s) as client:
        t0 = time.perf_counter()  # after the client exists: building its TLS context takes tens of ms
        await asyncio.gather(*(worker(w, client, t0, t0 + duration_s) for w in range(concurrency)))
    wall = max(r.end_s for r in records)
    return LevelResult(target, concurrency, num_predict, records, wall, list(os.getloadavg()))


async def probe(target: ServeTarget, num_predict: int, prompt: str, seed: int, timeout_s: float, what: str) -> None:
    """One request that must succeed, else a TpOllamaError naming the target's URL and what went wrong."""
    record = Record(worker=-1, prompt=0, start_s=0.0)
    body = target.wire.body(target.model, prompt, num_predict, seed)
    async with _client(1, timeout_s) as client:
        await one_request(client, target, record, body, timeout_s, time.perf_counter())
    if not record.ok:
        why = record.error or f"no complete reply within {timeout_s:g} s"
        raise TpOllamaError(f"{what} of target {target.label!r} at {target.url}{target.wire.route} failed: {why}")


# ---- the whole run ------------------------------------------------------------------------------


def _check_settings(
    targets: Sequence[ServeTarget],
    concurrency: Sequence[int],
    duration_s: float,
    num_predict: int,
    request_timeout_s: float,
    rounds: int,
) -> None:
    if not targets:
        raise ConfigError("no serve targets: expected at least one [NAME@]KIND=URL")
    labels = [t.label for t in targets]
    duplicated = sorted({x for x in labels if labels.count(x) > 1})
    if duplicated:
        raise ConfigError(f"target labels {duplicated} repeat: name them apart with NAME@KIND=URL")
    if not concurrency or any(c < 1 for c in concurrency) or len(set(concurrency)) != len(concurrency):
        raise ConfigError(f"concurrency {list(concurrency)} is invalid: expected distinct integers >= 1")
    if duration_s <= 0 or num_predict < 1 or request_timeout_s <= 0 or rounds < 1:
        got = f"duration_s={duration_s}, num_predict={num_predict}, request_timeout_s={request_timeout_s}, "
        raise ConfigError(f"{got}rounds={rounds} is invalid: expected duration, timeout > 0 and counts >= 1")


@contextlib.contextmanager
def _progress(total: int, description: str, show: bool) -> Iterator[Any]:
    if not show:
        yield None
        return
    with report.Progress(total, description) as bar:
        yield bar


def run_serve(
    targets: list[ServeTarget],
    concurrency: list[int],
    duration_s: float,
    num_predict: int,
    prompts: list[str] | None = None,
    seed: int = 0,
    request_timeout_s: float = 120,
    rounds: int = 1,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load every target at every concurrency; a report of kind "serve" (one Result per target and
    concurrency: of `rounds` levels, the one with the best aggregate tok/s, all of them in extra)."""
    _check_settings(targets, concurrency, duration_s, num_predict, request_timeout_s, rounds)
    prompt_list = list(prompts) if prompts is not None else list(PROMPTS)
    if not prompt_list:
        raise ConfigError("no prompts to send: expected at least one")
    settings = {
        "targets": [{"label": t.label, "kind": t.kind, "url": t.url, "route": t.wire.route} for t in targets],
        "concurrency": list(concurrency),
        "duration_s": duration_s,
        "num_predict": num_predict,
        "seed": seed,
        "request_timeout_s": request_timeout_s,
        "rounds": rounds,
        "prompts": prompt_list,
    }
    out = report.new_report("serve", settings, argv)
    for t in targets:  # every target answers before minutes go into any of them
        asyncio.run(probe(t, 1, prompt_list[0], seed, request_timeout_s, "the reachability check"))
    levels: dict[tuple[str, int], list[LevelResult]] = {}
    warmed: set[str] = set()
    with _progress(len(concurrency) * rounds * len(targets), "serve", progress) as bar:
        for c in concurrency:
            for _ in range(rounds):
                for t in targets:  # alternate targets per level so drift hits all of them
                    if t.label not in warmed:  # load the model and warm the path; not measured
                        asyncio.run(probe(t, num_predict, prompt_list[0], seed, request_timeout_s, "the warm-up"))
                        warmed.add(t.label)
                    level = asyncio.run(run_level(t, c, duration_s, num_predict, prompt_list, seed, request_timeout_s))
                    levels.setdefault((t.label, c), []).append(level)
                    if bar is not None:
                        bar.advance(f"{t.label} C={c}: {level.aggregate_tok_s:.1f} tok/s")
    for c in concurrency:
        for t in targets:
            _add_level_result(out, levels[(t.label, c)], rounds)
    out["notes"].extend(_notes(out["results"], targets))
    return out


def _add_level_result(out: dict[str, Any], rounds_run: list[LevelResult], rounds: int) -> None:
    best = max(rounds_run, key=lambda lv: lv.aggregate_tok_s)
    t = best.target
    extra = {
        **best.extra(),
        "kind": t.kind,
        "url": t.url,
        "aggregate_tok_s_rounds": [lv.aggregate_tok_s for lv in rounds_run],
    }
    config = {"concurrency": best.concurrency, "num_predict": best.num_predict, "model": t.model}
    report.add_result(out, t.label, config, rounds=rounds, **best.metrics(), extra=extra)


def _notes(results: Sequence[dict[str, Any]], targets: Sequence[ServeTarget]) -> list[str]:
    notes = []
    early = [f"{r['target']} C={r['config']['concurrency']}" for r in results if r["extra"]["stopped_early"]]
    if early:
        notes.append(
            "some requests stopped before num_predict tokens (end of sequence; only llama.cpp can ignore it): "
            + ", ".join(early)
        )
    failed = [
        f"{r['target']} C={r['config']['concurrency']}"
        for r in results
        if r["requests"]["errors"] or r["requests"]["timeouts"]
    ]
    if failed:
        notes.append("failed or timed-out requests (not in the aggregate; see error_samples): " + ", ".join(failed))
    if any(t.kind == "llamacpp" for t in targets):
        notes.append("llama.cpp targets decode with ignore_eos and cache_prompt off")
    return notes
