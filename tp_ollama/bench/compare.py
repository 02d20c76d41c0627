"""`tp-ollama bench compare`: several targets on the same model in one run, alternating target by
target every round so that the machine's drift hits all alike, with ratios pair by pair.

Targets (each optionally labelled `LABEL@TARGET`):

    tp-ollama[:tp=N,quant=Q,dtype=D,comm=C]   the engine (fresh ranks each round, as `bench decode`)
    transformers[:dtype=D]                    transformers on the same checkpoint (optional extra)
    llama.cpp                                 llama.cpp through llama-cpp-python on the same GGUF (optional extra)
    ollama=URL | llamacpp=URL | openai=URL    a running server under HTTP load (as `bench serve`);
                                              a run compares either engines or servers, not both

Engines share one workload (prompt and generation lengths, total threads), so every pair of targets
gets a ratio for each figure both measured. `--cold-start` adds process start to first token:
`tp-ollama generate --num-predict 1` for the engine, the peer's own process for the others.

Each target's bandwidth fraction is bytes read per token (weights, and the keys and values the
attention reads) x tok/s over the host's read bandwidth, probed before the first round and after
each (machine.read_bandwidth_probes_gbs; read_bandwidth_gbs is the highest): each round against the
higher probe around it, the median over rounds (extra.bandwidth_fraction_rounds holds every round's).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tp_ollama.bench import report as rpt
from tp_ollama.bench.decode import DecodeConfig, Nodes, run_once, summarize_runs
from tp_ollama.errors import ConfigError, TpOllamaError

ENGINE = "tp-ollama"
ENGINE_KEYS: dict[str, type] = {"tp": int, "quant": str, "dtype": str, "comm": str}
PEER_KEYS: dict[str, dict[str, type]] = {"transformers": {"dtype": str}, "llama.cpp": {}}
URL_KINDS = ("ollama", "llamacpp", "openai")
HEADLINE = ("decode_tok_s", "prompt_tok_s", "ttft_s", "cold_start_s", "load_s")
COLD_PROMPT = "Hello"


@dataclass(frozen=True)
class EngineTarget:
    label: str
    kind: str  # "tp-ollama", "transformers" or "llama.cpp"
    options: dict[str, Any] = field(default_factory=dict)


def is_url_target(spec: str) -> bool:
    body = spec.partition("@")[2] if "@" in spec else spec
    return body.partition("=")[0] in URL_KINDS and "://" in body


def parse_engine_target(spec: str) -> EngineTarget:
    """`[LABEL@]KIND[:k=v,...]` for the engine and the in-process peers."""
    label, _, body = spec.rpartition("@")
    kind, _, opts = body.partition(":")
    known: dict[str, dict[str, type]] = {ENGINE: ENGINE_KEYS, **PEER_KEYS}
    if kind not in known:
        raise ConfigError(
            f"compare target {spec!r} is invalid: expected one of {', '.join(known)} (with :key=value options) "
            f"or {'|'.join(URL_KINDS)}=URL"
        )
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in known[kind]:
            allowed = ", ".join(known[kind]) or "none"
            raise ConfigError(f"compare target {spec!r}: option {item!r} is invalid; {kind} takes: {allowed}")
        try:
            options[key] = known[kind][key](value)
        except ValueError:
            raise ConfigError(f"compare target {spec!r}: {key}={value!r} is not a valid {key}") from None
    if not label:
        label = kind + ("" if not options else " " + " ".join(f"{k}={v}" for k, v in options.items()))
    return EngineTarget(label, kind, options)


def _cold_start(model: str, cfg: DecodeConfig, timeout_s: float) -> float:
    cmd = [sys.executable, "-m", "tp_ollama", "generate", model, COLD_PROMPT, "--num-predict", "1", "--temperature",
           "0", "--quant", cfg.quant, "--dtype", cfg.dtype, "--tp", str(cfg.tp)]  # fmt: skip
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TpOllamaError(f"cold start of {model} did not finish within {timeout_s:g} s") from None
    if done.returncode != 0:
        raise TpOllamaError(f"cold start of {model} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t


def _peer_bytes(
    target: EngineTarget, path: Path, measured: dict[str, Any], prompt: int, gen: int
) -> tuple[int, int] | None:
    """What one decode step of a peer reads, (weights, keys and values): its weights, and the keys and
    values of the model's attention over the run's decode steps (llama.cpp keeps them in float16,
    transformers in the weights' dtype), counted as for the engine (bench.decode.kv_read_bytes)."""
    from tp_ollama.bench.decode import kv_read_bytes
    from tp_ollama.checkpoints.loader import open_checkpoint

    weights: int | None
    if target.kind == "llama.cpp":
        from tp_ollama.checkpoints.gguf_file import GGUFFile

        with GGUFFile(path) as f:
            weights, item = sum(t.nbytes for t in f.tensors.values()), 2
    else:
        weights = measured.get("weight_bytes")
        item = 2 if target.options.get("dtype", "float32") in ("bfloat16", "float16") else 4
    if not weights:
        return None
    ckpt = open_checkpoint(path)
    try:
        config = ckpt.config
    finally:
        ckpt.close()
    return weights, kv_read_bytes(config, config.num_key_value_heads, item, prompt, gen - 1)


def run_compare(
    model: str,
    targets: Sequence[str],
    prompt_tokens: int = 32,
    gen_tokens: int = 64,
    threads: int | None = None,
    rounds: int = 3,
    cold_start: bool = False,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Engines and peers on one workload, alternating; see the module docstring."""
    from tp_ollama.bench.peers import run_peer
    from tp_ollama.parallel.preflight import read_bandwidth_gbs
    from tp_ollama.store.embedded import resolve_model

    if len(targets) < 2:
        raise ConfigError(f"compare needs at least two targets, got {len(targets)}")
    if any(is_url_target(t) for t in targets):
        raise ConfigError("servers (KIND=URL targets) are compared with `bench compare --serve`; do not mix them")
    if rounds < 1:
        raise ConfigError(f"rounds {rounds} is invalid: expected at least 1")
    parsed = [parse_engine_target(t) for t in targets]
    labels = [t.label for t in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare targets need distinct labels, got {labels}; name them LABEL@TARGET")
    threads = threads or os.cpu_count() or 1
    path = resolve_model(model)
    # The roofline is probed before the first round and after each: on a shared host it moves with the
    # neighbours' load (see _paired_fractions).
    probes = [read_bandwidth_gbs(threads)]
    workload = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": threads}
    report = rpt.new_report("compare", {"model": model, "rounds": rounds, "cold_start": cold_start, **workload}, argv)
    engine_cfg = {t.label: _engine_config(t, prompt_tokens, gen_tokens) for t in parsed if t.kind == ENGINE}
    runs: dict[str, list[dict[str, Any]]] = {t.label: [] for t in parsed}
    colds: dict[str, list[float]] = {t.label: [] for t in parsed}
    with rpt.Progress(rounds * len(parsed), "compare", enabled=progress) as bar:
        for r in range(rounds):
            for t in parsed:
                bar.advance(f"round {r + 1}/{rounds}: {t.label}")
                if t.kind == ENGINE:
                    cfg = engine_cfg[t.label]
                    with _threads_per_rank(threads, cfg.tp):
                        out = run_once(model, cfg, Nodes(), measure_link=False)
                        if cold_start:
                            colds[t.label].append(_cold_start(model, cfg, timeout_s))
                    assert out is not None
                    runs[t.label].append(out)
                else:
                    dtype = t.options.get("dtype", "float32")
                    out = run_peer(t.kind, path, prompt_tokens, gen_tokens, threads, dtype, timeout_s)
                    runs[t.label].append(out)
                    colds[t.label].append(out["cold_start_s"])
            probes.append(read_bandwidth_gbs(threads))
    report["machine"] = {**rpt.machine_info(max(probes)), "read_bandwidth_probes_gbs": probes}
    for t in parsed:
        extra = {"kind": t.kind, "options": t.options}
        if t.kind == ENGINE:
            metrics = summarize_runs(engine_cfg[t.label], runs[t.label], None)  # fractions: below
            metrics["extra"] = {**metrics["extra"], **extra}
        else:
            step_bytes = _peer_bytes(t, path, runs[t.label][0], prompt_tokens, gen_tokens)
            metrics = _peer_metrics(runs[t.label], step_bytes)
            metrics["extra"] = {**extra, "kv_bytes_per_token": metrics.pop("kv_bytes_per_token", [])}
        if "bandwidth" in metrics:
            fractions, by_round = _paired_fractions(metrics["bandwidth"]["bytes_per_token"],
                                                    metrics["decode_tok_s_rounds"], probes)  # fmt: skip
            metrics["bandwidth"]["fraction"] = fractions
            metrics["extra"]["bandwidth_fraction_rounds"] = by_round
        if cold_start:
            metrics["cold_start_s"] = statistics.median(colds[t.label])
            metrics["extra"]["cold_start_s_rounds"] = colds[t.label]
        rpt.add_result(report, t.label, workload, rounds=rounds, **metrics)
    rpt.pairwise_ratios(report, HEADLINE)
    return report


def _paired_fractions(
    bytes_per_rank: Sequence[int], tok_s_rounds: Sequence[float], probes: Sequence[float]
) -> tuple[list[float], list[list[float]]]:
    """Each rank's bandwidth fraction: per round, bytes x that round's tok/s over the higher of the two
    probes around the round (probes[r] before it, probes[r + 1] after), then the median over rounds.
    A round is held against the memory as it was then, not against a probe taken while the
    neighbours were quiet or busy in another round. Returns the medians and, per round, the fractions."""
    by_round = [
        [b * tok_s / 1e9 / max(probes[r], probes[r + 1]) for b in bytes_per_rank]
        for r, tok_s in enumerate(tok_s_rounds)
    ]
    medians = [statistics.median(row[i] for row in by_round) for i in range(len(bytes_per_rank))]
    return medians, by_round


def _engine_config(t: EngineTarget, prompt_tokens: int, gen_tokens: int) -> DecodeConfig:
    base = DecodeConfig(tp=1, dtype="auto", quant="auto", prompt_tokens=prompt_tokens, gen_tokens=gen_tokens)
    return replace(base, **t.options)


@contextlib.contextmanager
def _threads_per_rank(threads: int, tp: int) -> Iterator[None]:
    """OMP_NUM_THREADS = threads / tp for the engine's ranks while a run lasts; left alone when the
    run may use every CPU (the ranks split the host themselves)."""
    if threads == (os.cpu_count() or 1):
        yield
        return
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads // tp))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _peer_metrics(runs: list[dict[str, Any]], step_bytes: tuple[int, int] | None) -> dict[str, Any]:
    decode = statistics.median(r["decode_tok_s"] for r in runs)
    metrics: dict[str, Any] = {
        "decode_tok_s": decode,
        "decode_tok_s_rounds": [r["decode_tok_s"] for r in runs],
        "prompt_tok_s": statistics.median(r["prompt_tok_s"] for r in runs),
        "ttft_s": rpt.summarize([r["ttft_s"] for r in runs]),
        "load_s": statistics.median(r["load_s"] for r in runs),
        "peak_rss_mb": [max(r["peak_rss_mb"] for r in runs)],
        "per_token_ms": {"compute": 1e3 / decode, "communication": 0.0, "total": 1e3 / decode},
    }
    if step_bytes:
        total = sum(step_bytes)
        achieved = total * decode / 1e9
        metrics["kv_bytes_per_token"] = [step_bytes[1]]
        metrics["bandwidth"] = {
            "bytes_per_token": [total],
            "achieved_gbs": [achieved],
            "fraction": [],  # held against the bandwidth round by round in run_compare
        }
    return metrics


def run_compare_serve(
    model: str,
    targets: Sequence[str],
    concurrency: Sequence[int],
    duration_s: float,
    num_predict: int,
    rounds: int = 1,
    prompts: list[str] | None = None,
    request_timeout_s: float = 120.0,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Running servers under the same HTTP load, levels alternating between them, with ratios."""
    from tp_ollama.bench.serve import run_serve
    from tp_ollama.bench.serve_targets import parse_target

    if len(targets) < 2:
        raise ConfigError(f"compare needs at least two targets, got {len(targets)}")
    bad = [t for t in targets if not is_url_target(t)]
    if bad:
        raise ConfigError(f"compare --serve takes KIND=URL targets ({'|'.join(URL_KINDS)}), got {bad}")
    report = run_serve(
        [parse_target(t, model) for t in targets],
        list(concurrency),
        duration_s,
        num_predict,
        prompts=prompts,
        request_timeout_s=request_timeout_s,
        rounds=rounds,
        progress=progress,
        argv=argv,
    )
    report["kind"] = "compare"
    rpt.pairwise_ratios(report, ("aggregate_tok_s", "ttft_s", "itl_s"))
    return report
