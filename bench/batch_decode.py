"""Aggregate decode speed of the batching engine in one process, without HTTP: B requests of the same
length decoded together (engine/batch.py over the paged KV pool), for B in 1, 4, 8, 16, next to the
one-request generate loop. What batching buys per step, before any front-end overhead.

    PYTHONPATH=. python bench/batch_decode.py [--model gemma3:270m] [--threads 2] [--quant int8 --dtype auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def run_batch(model: Any, batch_size: int, prompt: list[int], tokens: int) -> dict[str, float]:
    from tp_ollama.engine.batch import Batch, Planner, Request
    from tp_ollama.engine.options import GenerationOptions
    from tp_ollama.engine.paged_kv import BlockPool
    from tp_ollama.engine.sampler import Sampler

    pool = BlockPool.for_model(model, 1 << 30, prefix_cache=False)  # no reuse: every prompt is computed
    batch, planner = Batch(model, pool, Sampler, lambda r: None), Planner(pool, batch_size, chunk=4096)
    options = GenerationOptions.from_ollama({"temperature": 0, "num_predict": tokens, "num_ctx": 512})
    planner.waiting.extend(Request(f"r{i}", prompt, options, frozenset()) for i in range(batch_size))
    generated, steps = 0, 0
    t0 = time.perf_counter()
    first = None
    while batch.running or planner.waiting:
        for event in batch.step(planner.plan(batch, set())):
            if event.token is not None:
                generated += 1
            if event.done:
                planner.finished(event.id)
        steps += 1
        if first is None:
            first = time.perf_counter()  # the prefill step
    total = time.perf_counter() - t0
    assert first is not None
    return {"tok_s": generated / total, "decode_tok_s": (generated - batch_size) / (time.perf_counter() - first),
            "step_ms": (time.perf_counter() - first) / max(1, steps - 1) * 1e3, "generated": generated}  # fmt: skip


def main() -> None:
    from tp_ollama.checkpoints.loader import load_model, open_checkpoint, resolve_dtype
    from tp_ollama.engine.direct import generate_ids
    from tp_ollama.engine.options import GenerationOptions
    from tp_ollama.store.embedded import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_decode.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = open_checkpoint(resolve_model(args.model))
    model = load_model(ckpt, resolve_dtype(args.dtype), torch.device("cpu"), quant=args.quant)
    prompt = list(range(100, 132))
    results: dict[str, Any] = {"model": args.model, "threads": args.threads, "tokens": args.tokens,
                               "dtype": args.dtype, "quant": args.quant,
                               "prompt_tokens": len(prompt), "machine": platform.machine(), "batch": {}}  # fmt: skip
    with torch.inference_mode():
        options = GenerationOptions.from_ollama({"temperature": 0, "num_predict": args.tokens, "num_ctx": 512})
        gen = generate_ids(model, prompt, options, frozenset())
        next(gen)
        t0 = time.perf_counter()
        n = sum(1 for _ in gen)
        results["single_loop_decode_tok_s"] = n / (time.perf_counter() - t0)
        print("generate loop", round(results["single_loop_decode_tok_s"], 1), "tok/s")
        for size in args.sizes:
            r = run_batch(model, size, prompt, args.tokens)
            results["batch"][str(size)] = r
            print(f"B={size}", {k: round(v, 1) for k, v in r.items()})
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
