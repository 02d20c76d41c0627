"""`tp-ollama bench decode`: the engine in its own processes, over TP degrees, dtypes, weight
packings, prompt and generation lengths.

Every configuration and round starts fresh ranks through the same launcher as `generate --tp N`
(so peak RSS and load time are that run's own), and the configurations alternate round by round so
that the machine's drift hits all alike. Per run, on every rank:

    load_s          reading (or unpacking from the packed cache) this rank's shard
    ttft_s          prefill of `prompt_tokens` prompt ids and the first token
    decode          `gen_tokens` - 1 further tokens, greedy, end-of-text ignored (every run decodes
                    exactly that many); tok/s = those tokens / their wall time on rank 0
    communication   time inside collectives during decode (the communicator's own clock), per token;
                    compute is the rest of the token's time
    step_ms_p50     the median token's time (extra): what the cost model is checked against, since a
                    mean also carries the steps the OS descheduled
    bytes_per_token what one decode step reads on the rank: the weights it holds, each storage once,
                    and the keys and values its attention reads, averaged over the run's steps
                    (kv_read_bytes; extra.kv_bytes_per_token)
    peak_rss_mb     the rank's peak resident set

The prompt is fixed token ids: timing does not depend on the text, and no tokenizer is loaded.
With several ranks the link between them is measured too (all-reduce of a small and a large message),
and the cost model (tp_ollama.parallel.costmodel), calibrated on the TP=1 run of the same dtype, packing
and lengths (this report's, or a `--calibration` report's), predicts each TP>1 run from its shape and
that measured link: predicted_ms_per_token next to measured_ms_per_token in the report.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tp_ollama.bench import report as rpt
from tp_ollama.bench.report import peak_rss_mb
from tp_ollama.errors import ConfigError

TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DecodeConfig:
    tp: int
    dtype: str
    quant: str
    prompt_tokens: int
    gen_tokens: int
    comm: str = "auto"
    pp: int = 1  # pipeline stages (tp_ollama.parallel.pipeline): tp x pp ranks
    streams: int = 1  # > 1: also that many requests decoding together, as a server's batch runs them

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ConfigError(f"streams {self.streams} is invalid: expected at least 1")
        if self.tp < 1:
            raise ConfigError(f"tp {self.tp} is invalid: expected at least 1")
        if self.pp < 1:
            raise ConfigError(f"pp {self.pp} is invalid: expected at least 1")
        if self.prompt_tokens < 1:
            raise ConfigError(f"prompt length {self.prompt_tokens} is invalid: expected at least 1 token")
        if self.gen_tokens < 2:
            raise ConfigError(f"generation length {self.gen_tokens} is invalid: expected at least 2 tokens")

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        stages = f" pp={self.pp}" if self.pp > 1 else ""
        streams = f" x{self.streams} streams" if self.streams > 1 else ""
        return f"tp-ollama tp={self.tp}{stages} {self.quant}/{self.dtype}{streams}"


@dataclass(frozen=True)
class Nodes:
    """Where the ranks run: this machine alone, or node `node_rank` of `nnodes` (each runs the same command)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0


def prompt_ids(n: int, vocab: int) -> list[int]:
    """n ordinary token ids spread over the vocabulary, away from the special ids at its start."""
    low = min(1000, vocab // 4)
    return [low + (i * 7919) % (vocab - low) for i in range(n)]


def kv_read_bytes(config: Any, kv_heads: int, item_bytes: int, first_pos: int, steps: int) -> int:
    """Bytes of keys and values one decode step reads, averaged over `steps` steps from position
    `first_pos`: the step at position p attends p + 1 positions in each layer, a sliding-window layer
    at most its window, over `kv_heads` heads of head_dim (keys and values) of `item_bytes` each."""
    from tp_ollama.models.llama import SLIDING

    n_layers = int(config.num_hidden_layers)
    head_dim = int(config.head_dim or config.hidden_size // config.num_attention_heads)
    window = getattr(config, "sliding_window", None)
    kinds = tuple(getattr(config, "layer_types", ()) or ()) or ("full",) * n_layers
    if steps < 1:
        return 0
    seen = 0
    for p in range(first_pos, first_pos + steps):
        seen += sum(min(p + 1, window) if kind == SLIDING and window else p + 1 for kind in kinds)
    return round(seen * 2 * kv_heads * head_dim * item_bytes / steps)


def rank_decode(model: str, config: dict[str, Any], measure_link: bool) -> dict[str, Any] | None:
    """One rank of one run (torchrun entry point). Rank 0 returns every rank's figures."""
    import torch

    from tp_ollama.engine.direct import GenerationStats, generate_ids
    from tp_ollama.engine.options import GenerationOptions, SamplingOptions
    from tp_ollama.kernels.linear import activation_like, model_bytes, out_features
    from tp_ollama.parallel.comm import join_group
    from tp_ollama.parallel.preflight import link_preflight
    from tp_ollama.parallel.shard import load_shard
    from tp_ollama.store.embedded import resolve_model

    cfg = DecodeConfig(**config)
    comm = join_group(cfg.comm, TIMEOUT_S)
    t0 = time.perf_counter()
    m, layout, ckpt = load_shard(resolve_model(model), comm, cfg.dtype, quant=cfg.quant, pp=cfg.pp)
    ckpt.close()
    load_s = time.perf_counter() - t0
    link = None
    if measure_link and comm.world_size > 1:
        from tp_ollama.bench.collectives import LINK_BENCH_BUDGET_S, configured_link
        from tp_ollama.parallel.preflight import measure_link as measure

        link = {**measure(comm, budget_s=LINK_BENCH_BUDGET_S), "configured": configured_link()}
    warning = link_preflight(comm, m, link)  # across hosts only: what launch would say before this run
    if warning is not None:
        print(f"Warning: {warning}", file=sys.stderr, flush=True)
    vocab = int(m.config.vocab_size)  # type: ignore[union-attr, arg-type]
    prompt = prompt_ids(cfg.prompt_tokens, vocab)
    options = GenerationOptions(
        sampling=SamplingOptions(temperature=0), num_predict=cfg.gen_tokens, num_ctx=cfg.prompt_tokens + cfg.gen_tokens
    )
    stats = GenerationStats()
    gen = generate_ids(m, prompt, options, comm=comm, layout=layout, stats=stats)
    t1 = time.perf_counter()
    next(gen)
    ttft_s = time.perf_counter() - t1
    counts_before, comm_before = dict(comm.stats), comm.seconds
    t2 = last = time.perf_counter()
    last_comm = comm_before
    steps_s: list[float] = []  # every token's own time: medians shrug off a descheduled step
    steps_comm_s: list[float] = []
    for _ in gen:
        now, in_comm = time.perf_counter(), comm.seconds
        steps_s.append(now - last)
        steps_comm_s.append(in_comm - last_comm)
        last, last_comm = now, in_comm
    tokens = len(steps_s)
    decode_s = time.perf_counter() - t2
    here = [b for b in m.model.layers if not getattr(b, "absent", False)]  # type: ignore[union-attr]
    attn = here[0].self_attn
    kv_heads, item = out_features(attn.k_proj) // attn.head_dim, activation_like(m).element_size()
    kv_bytes = kv_read_bytes(m.config, kv_heads, item, cfg.prompt_tokens, tokens)
    row = {
        "step_s_p50": statistics.median(steps_s),
        "step_comm_s_p50": statistics.median(steps_comm_s),
        "step_s": rpt.summarize(steps_s),
        "rank": comm.rank,
        "load_s": load_s,
        "ttft_s": ttft_s,
        "decode_s": decode_s,
        "tokens": tokens,
        "comm_s": comm.seconds - comm_before,
        "bytes": model_bytes(m) + kv_bytes,
        "kv_bytes": kv_bytes,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "collectives_per_token": {k: (v - counts_before.get(k, 0)) / max(tokens, 1) for k, v in comm.stats.items()},
    }
    if cfg.streams > 1:
        row["streams"] = _streams(m, layout, comm, cfg, prompt, options)
    # Every rank's row reaches rank 0 (ranks on other nodes return to their own launcher only).
    rows = [json.loads(comm.broadcast_bytes(json.dumps(row).encode() if r == comm.rank else None, src=r))
            for r in range(comm.world_size)]  # fmt: skip
    comm.close()
    if comm.rank != 0:
        return None
    return {"ranks": rows, "link": link}


def _streams(m: Any, layout: Any, comm: Any, cfg: DecodeConfig, prompt: list[int], options: Any) -> dict[str, Any]:
    """cfg.streams requests at once through the engine's batch (each its own prompt: the prompt turned
    by its index, so no prefix is shared): aggregate tok/s over the whole run, prompts included, and
    the sum of each stream's decode tok/s."""
    from tp_ollama.engine.direct import DirectEngine, GenerationStats
    from tp_ollama.engine.state import EngineJob

    engine = DirectEngine(EngineJob(kv_cache_bytes=None, max_running=cfg.streams), comm)
    engine.attach(m, layout, "", options.num_ctx)
    prompts = [prompt[i % len(prompt) :] + prompt[: i % len(prompt)] for i in range(cfg.streams)]
    stats = [GenerationStats() for _ in prompts]
    t0 = time.perf_counter()
    tokens = engine.generate_all(prompts, [options] * cfg.streams, stats=stats)
    wall = time.perf_counter() - t0
    total = sum(len(t) for t in tokens)
    flow = engine.state.batch.flow if engine.state.batch is not None else None
    return {
        "streams": cfg.streams,
        "tokens": total,
        "wall_s": wall,
        "aggregate_tok_s": total / wall,
        "decode_tok_s": sum(s.eval_count / (s.eval_duration / 1e9) for s in stats if s.eval_duration),
        "full_ticks": flow.full_ticks if flow is not None else None,
        "ticks": flow.ticks if flow is not None else None,
    }


def run_once(model: str, cfg: DecodeConfig, nodes: Nodes, measure_link: bool, index: int = 0) -> dict[str, Any] | None:
    """One run in fresh ranks. Across nodes the k-th run of a bench meets at master_port + k: every node
    counts runs alike, and no node can reach the rendezvous store of the run before, still lingering."""
    from tp_ollama.launch import Cluster, run_workers

    if cfg.world % nodes.nnodes:
        raise ConfigError(
            f"tp x pp = {cfg.world} is invalid across {nodes.nnodes} nodes: expected a multiple of the node count"
        )
    cluster = Cluster(
        nnodes=nodes.nnodes,
        node_rank=nodes.node_rank,
        nproc_per_node=cfg.world // nodes.nnodes,
        master_addr=nodes.master_addr,
        master_port=nodes.master_port + index if nodes.nnodes > 1 else nodes.master_port,
    )
    out = run_workers(cluster, rank_decode, model, asdict(cfg), measure_link)
    return out.get(0) if nodes.node_rank == 0 else None


def summarize_runs(cfg: DecodeConfig, runs: list[dict[str, Any]], read_bw_gbs: float | None) -> dict[str, Any]:
    """The figures of one configuration over its rounds: medians, the rounds kept in full."""
    tok_s = [r["ranks"][0]["tokens"] / r["ranks"][0]["decode_s"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["ranks"][0]["tokens"] / r["ranks"][0]["decode_s"])[len(runs) // 2]
    ranks = median_run["ranks"]
    head = ranks[0]
    per_token_s = head["decode_s"] / head["tokens"]
    comm_s = head["comm_s"] / head["tokens"]
    decode = statistics.median(tok_s)
    bytes_per_token = [int(r["bytes"]) for r in ranks]
    achieved = [b * decode / 1e9 for b in bytes_per_token]
    streams = [r["ranks"][0]["streams"] for r in runs if "streams" in r["ranks"][0]]
    metrics: dict[str, Any] = {
        "decode_tok_s": decode,
        "decode_tok_s_rounds": tok_s,
        "prompt_tok_s": statistics.median(cfg.prompt_tokens / r["ranks"][0]["ttft_s"] for r in runs),
        "ttft_s": rpt.summarize([r["ranks"][0]["ttft_s"] for r in runs]),
        "load_s": statistics.median(r["ranks"][0]["load_s"] for r in runs),
        "peak_rss_mb": [max(run["ranks"][i]["peak_rss_mb"] for run in runs) for i in range(len(ranks))],
        "bandwidth": {
            "bytes_per_token": bytes_per_token,
            "achieved_gbs": achieved,
            "fraction": [a / read_bw_gbs for a in achieved] if read_bw_gbs else [],
        },
        "per_token_ms": {
            "compute": 1e3 * (per_token_s - comm_s),
            "communication": 1e3 * comm_s,
            "total": 1e3 * per_token_s,
        },
        "extra": {
            # The typical token: medians of the per-token times over every round (the cost model's figure).
            "step_ms_p50": 1e3 * statistics.median(r["ranks"][0]["step_s_p50"] for r in runs),
            "step_comm_ms_p50": 1e3 * statistics.median(r["ranks"][0]["step_comm_s_p50"] for r in runs),
            "step_s_rounds": [r["ranks"][0]["step_s"] for r in runs],
            "threads_per_rank": [r["threads"] for r in ranks],
            "kv_bytes_per_token": [int(r.get("kv_bytes", 0)) for r in ranks],
            "collectives_per_token": head["collectives_per_token"],
            "link": median_run["link"],
        },
    }
    if streams:
        metrics["streams"] = {
            "streams": cfg.streams,
            "aggregate_tok_s": statistics.median(x["aggregate_tok_s"] for x in streams),
            "decode_tok_s": statistics.median(x["decode_tok_s"] for x in streams),
            "predicted_tok_s": None,
            "rounds": streams,
        }
    return metrics


def run_decode(
    model: str,
    tp: Sequence[int] = (1,),
    dtypes: Sequence[str] = ("auto",),
    quants: Sequence[str] = ("auto",),
    prompt_tokens: Sequence[int] = (32,),
    gen_tokens: Sequence[int] = (64,),
    rounds: int = 1,
    comm: str = "auto",
    nodes: Nodes | None = None,
    read_bandwidth: bool = True,
    calibration: dict[str, Any] | None = None,
    ranks_per_host: int | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    pp: Sequence[int] = (1,),
    streams: int = 1,
) -> dict[str, Any] | None:
    """Measure every combination; returns the report on node 0 (None on the others). `calibration`: an
    earlier decode report whose TP=1 runs calibrate the cost model; `ranks_per_host`: ranks sharing one
    memory bus, for the prediction (default: the ranks each node runs)."""
    from tp_ollama.parallel.comm import check_comm_kind

    nodes = nodes or Nodes()
    check_comm_kind(comm)
    if rounds < 1:
        raise ConfigError(f"rounds {rounds} is invalid: expected at least 1")
    axes = itertools.product(pp, tp, dtypes, quants, prompt_tokens, gen_tokens)
    configs = [DecodeConfig(t, d, q, p, g, comm, s, streams) for s, t, d, q, p, g in axes]
    if not configs:
        raise ConfigError("nothing to measure: give at least one value for every axis")
    bandwidth = host_bandwidth = None
    if read_bandwidth and nodes.node_rank == 0:
        from tp_ollama.parallel.preflight import host_read_bandwidth_gbs, read_bandwidth_gbs

        bandwidth = read_bandwidth_gbs()
        host_bandwidth = host_read_bandwidth_gbs()
    settings = {"model": model, "rounds": rounds, "comm": comm, "nodes": asdict(nodes)}
    report = rpt.new_report("decode", settings, argv)
    report["machine"] = rpt.machine_info(bandwidth)
    if bandwidth is not None and host_bandwidth is not None:
        report["machine"]["host_read_bandwidth_gbs"] = host_bandwidth
    runs: dict[DecodeConfig, list[dict[str, Any]]] = {c: [] for c in configs}
    with rpt.Progress(len(configs) * rounds, "decode", enabled=progress and nodes.node_rank == 0) as bar:
        for r in range(rounds):
            for cfg in configs:
                bar.advance(f"round {r + 1}/{rounds}: {cfg.label}, {cfg.prompt_tokens}+{cfg.gen_tokens} tokens")
                out = run_once(
                    model, cfg, nodes, measure_link=cfg.world > 1, index=r * len(configs) + configs.index(cfg)
                )
                if out is not None:
                    runs[cfg].append(out)
    if nodes.node_rank != 0:
        return None
    for cfg in configs:
        shown = {"comm": cfg.world > 1, "pp": cfg.pp > 1, "streams": cfg.streams > 1}
        config = {k: v for k, v in asdict(cfg).items() if shown.get(k, True)}
        rpt.add_result(report, cfg.label, config, rounds=rounds, **summarize_runs(cfg, runs[cfg], bandwidth))
    add_predictions(report, model, calibration or report, ranks_per_host)
    return report


def _workload(config: dict[str, Any]) -> tuple[Any, ...]:
    return config["dtype"], config["quant"], config["prompt_tokens"], config["gen_tokens"]


def add_predictions(
    report: dict[str, Any], model: str, calibration: dict[str, Any], ranks_per_host: int | None = None
) -> None:
    """Fill predicted/measured ms per token into every TP>1 result that has a measured link and a TP=1
    run of the same workload in `calibration` (a decode report); the rest are left as measured, with
    the reason in the report's notes."""
    from tp_ollama.checkpoints.loader import open_checkpoint, resolve_dtype
    from tp_ollama.checkpoints.quantize import auto_packings
    from tp_ollama.parallel.costmodel import Link, Quant, calibrate, predict, predict_pipeline, predict_streams
    from tp_ollama.parallel.shapes import shape_of
    from tp_ollama.store.embedded import resolve_model

    tp1 = {_workload(r["config"]): r for r in calibration["results"]
           if r["config"]["tp"] == 1 and r["config"].get("pp", 1) == 1}  # fmt: skip
    read_gbs = calibration["machine"].get("read_bandwidth_gbs")
    targets = [r for r in report["results"] if r["config"]["tp"] > 1 or r["config"].get("pp", 1) > 1]
    if not targets:
        return
    ckpt = open_checkpoint(resolve_model(model))
    shape = shape_of(ckpt.config)
    dtypes = {(r["config"]["dtype"], r["config"]["quant"]) for r in targets}
    resolved = {d: str(resolve_dtype(d[0], "cpu", ckpt, d[1])).removeprefix("torch.") for d in dtypes}
    auto = auto_packings(ckpt)  # what quant auto makes of each tensor (nothing of a float checkpoint)
    ckpt.close()
    nnodes = report["settings"]["nodes"]["nnodes"]
    for r in targets:
        cfg, link, base = r["config"], r["extra"].get("link"), tp1.get(_workload(r["config"]))
        why = None if base and link and read_gbs else "no TP=1 run of the same workload, link or read bandwidth"
        quant: Quant = auto if cfg["quant"] == "auto" else cfg["quant"]
        if why is not None:
            report["notes"].append(f"{r['target']}: no prediction ({why})")
            continue
        assert base is not None and read_gbs is not None
        dtype = resolved[cfg["dtype"], cfg["quant"]]
        context = cfg["prompt_tokens"] + cfg["gen_tokens"] // 2  # positions read, on average over decode
        bus_gbs = calibration["machine"].get("host_read_bandwidth_gbs", read_gbs)
        cal = calibrate(shape, quant, dtype, base["extra"]["step_ms_p50"] / 1e3, read_gbs * 1e9,
                        cores=os.cpu_count(), context=context, bus_bandwidth_bytes_s=bus_gbs * 1e9)  # fmt: skip
        hosts_ranks = ranks_per_host or max(1, cfg["tp"] // nnodes)
        measured_link = Link.from_us_gbs(link["latency_us"], link["bandwidth_gbs"])
        if cfg.get("pp", 1) > 1:  # stages (TP inside them is refused before this runs)
            p = predict_pipeline(shape, cfg["pp"], measured_link, cal, quant, dtype, context=context)
        else:
            p = predict(shape, cfg["tp"], measured_link, cal, quant, dtype, ranks_per_host=hosts_ranks, context=context)
        r["predicted_ms_per_token"] = p.total_s * 1e3
        r["measured_ms_per_token"] = r["extra"]["step_ms_p50"]
        r["prediction_error"] = r["predicted_ms_per_token"] / r["measured_ms_per_token"] - 1
        r["extra"]["predicted_per_token_ms"] = p.per_token_ms()
        if r.get("streams") and base.get("streams"):  # several at once, calibrated by one node's run of as many
            n = r["streams"]["streams"]
            rows_s = n / base["streams"]["decode_tok_s"]
            one_s = base["extra"]["step_ms_p50"] / 1e3
            r["streams"]["predicted_tok_s"] = predict_streams(p, n, one_s, rows_s, cfg.get("pp", 1) > 1)
        r["extra"]["prediction_notes"] = list(p.notes)
