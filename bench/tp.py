"""Decode speed and per-rank peak memory of one model at TP=1, 2, 3 on this machine, through the
same launcher and step loop as `tp-ollama generate --tp N`.

    python bench/tp.py                          # gemma3:270m, writes bench/results/tp.json
    python bench/tp.py --model smollm2:135m --tp 1 2 --comm auto gloo

decode_tok_s: generated tokens after the first, per second, on rank 0.
peak_rss_mb: the rank's peak resident memory (ru_maxrss) after loading and generating; no tokenizer
is loaded (the prompt is fixed token ids), so it is the shard plus the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def rank_run(model: str, dtype: str, comm_kind: str, tokens: int) -> dict[str, Any]:
    from tp_ollama.engine.direct import GenerationStats, generate_ids
    from tp_ollama.engine.options import GenerationOptions, SamplingOptions
    from tp_ollama.parallel.comm import init_distributed, make_comm
    from tp_ollama.parallel.shard import load_shard, local_threads
    from tp_ollama.store.embedded import resolve_model

    torch.set_num_threads(local_threads(int(os.environ["LOCAL_WORLD_SIZE"])))
    init_distributed("gloo", 300)
    comm = make_comm(comm_kind, 300)
    t0 = time.perf_counter()
    m, layout, _ = load_shard(resolve_model(model), comm, dtype)
    load_s = time.perf_counter() - t0
    prompt = list(range(1000, 1012))  # any 12 ids: timing does not depend on the text
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=tokens, num_ctx=512)
    stats = GenerationStats()
    gen = generate_ids(m, prompt, options, comm=comm, layout=layout, stats=stats)
    next(gen)
    t1 = time.perf_counter()
    before = dict(comm.stats)
    n = sum(1 for _ in gen)
    seconds = time.perf_counter() - t1
    per_token = {k: (v - before.get(k, 0)) / max(n, 1) for k, v in comm.stats.items()}
    comm.close()
    return {
        "rank": comm.rank,
        "load_s": load_s,
        "decode_tok_s": n / seconds,
        "collectives_per_token": per_token,
        "params": sum(p.numel() for p in m.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    from tp_ollama.launch import Cluster, run_workers

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--comm", nargs="+", default=["auto"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is kept")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tp.json"))
    args = ap.parse_args()
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # alternate configurations so drift hits all alike
        for tp in args.tp:
            for comm in args.comm if tp > 1 else ["none"]:
                kind = "gloo" if comm == "none" else comm
                out = run_workers(Cluster(nproc_per_node=tp), rank_run, args.model, args.dtype, kind, args.tokens)
                ranks = [out[r] for r in sorted(out)]
                runs.setdefault((tp, comm), []).append({"ranks": ranks})
                print(tp, comm, json.dumps(ranks[0]), file=sys.stderr, flush=True)
    results = []
    for (tp, comm), tries in runs.items():
        best = max(tries, key=lambda t: t["ranks"][0]["decode_tok_s"])
        results.append({
            "tp": tp,
            "comm": comm,
            "decode_tok_s": best["ranks"][0]["decode_tok_s"],
            "all_tries_tok_s": [t["ranks"][0]["decode_tok_s"] for t in tries],
            "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in best["ranks"]],
            "params_per_rank": [r["params"] for r in best["ranks"]],
            "collectives_per_token": best["ranks"][0]["collectives_per_token"],
            "threads_per_rank": best["ranks"][0]["threads"],
        })  # fmt: skip
    tp1 = next(r for r in results if r["tp"] == 1)
    for r in results:
        r["decode_vs_tp1"] = r["decode_tok_s"] / tp1["decode_tok_s"]
        r["max_rank_rss_vs_tp1"] = max(r["peak_rss_mb_per_rank"]) / tp1["peak_rss_mb_per_rank"][0]
    report = {
        "benchmark": "tp",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "model": args.model,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
