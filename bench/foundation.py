"""Load time and single-stream decode speed of the embedded models, tp-ollama next to transformers on
the same GGUF, in one run on one machine. Every measurement runs in a fresh process.

    python bench/foundation.py                      # writes bench/results/foundation.json
    python bench/foundation.py --tokens 64 --out x.json

cold: a fresh process and an empty tp-ollama cache (the GGUF tokenizer is converted);
warm: a fresh process with the cache filled (the usual case after the first run).
load_to_first_token_s: process start to the first generated token (imports included).
decode_tok_s: generated tokens after the first, per second of decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time, there was a little robot who"
MODELS = ["gemma3:270m", "smollm2:135m"]


def worker_ours(model: str, dtype: str, tokens: int, t_start: float) -> dict:
    import torch

    from tp_ollama.checkpoints.loader import parse_dtype
    from tp_ollama.completion import load
    from tp_ollama.engine.direct import GenerationStats, generate_ids
    from tp_ollama.engine.options import GenerationOptions, SamplingOptions
    from tp_ollama.text.prompt import prompt_tokens

    torch.manual_seed(0)
    loaded = load(model, parse_dtype(dtype))
    t_loaded = time.perf_counter()
    ids = prompt_tokens(loaded.tokenizer, PROMPT)
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=tokens)
    stats = GenerationStats()
    stream = generate_ids(loaded.model, ids, options, stats=stats)
    next(stream)
    t_first = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    t_end = time.perf_counter()
    return {
        "load_s": t_loaded - t_start,
        "load_to_first_token_s": t_first - t_start,
        "prompt_tokens": len(ids),
        "generated": n,
        "decode_tok_s": (n - 1) / (t_end - t_first),
    }


def worker_transformers(model: str, dtype: str, tokens: int, t_start: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from tp_ollama.store.embedded import resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
    t_loaded = time.perf_counter()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    stamps: list[float] = []

    class Clock(TextIteratorStreamer):
        def put(self, value: torch.Tensor) -> None:  # called once for the prompt, then per token
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=Clock(tok))
    n = out.shape[1] - ids.shape[1]
    t_first, t_end = stamps[1], stamps[-1]
    return {
        "load_s": t_loaded - t_start,
        "load_to_first_token_s": t_first - t_start,
        "prompt_tokens": ids.shape[1],
        "generated": n,
        "decode_tok_s": (n - 1) / (t_end - t_first),
    }


def run_worker(impl: str, model: str, dtype: str, tokens: int, cache: str) -> dict:
    env = {**os.environ, "TP_OLLAMA_CACHE": cache}
    cmd = [sys.executable, __file__, "--worker", impl, "--model", model, "--dtype", dtype]
    cmd += ["--tokens", str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["ours", "transformers"])
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "foundation.json"))
    args = ap.parse_args()
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_transformers
        print(json.dumps(fn(args.model, args.dtype, args.tokens, t_start)))
        return

    import torch

    results = []
    for model in MODELS:
        with tempfile.TemporaryDirectory() as cache:
            for dtype in ["float32", "bfloat16"]:
                for phase in ["cold", "warm"] if dtype == "float32" else ["warm"]:
                    r = run_worker("ours", model, dtype, args.tokens, cache)
                    results.append({"impl": "tp-ollama", "model": model, "dtype": dtype, "phase": phase, **r})
                    print(json.dumps(results[-1]), file=sys.stderr)
            r = run_worker("transformers", model, "float32", args.tokens, cache)
            results.append({"impl": "transformers", "model": model, "dtype": "float32", "phase": "warm", **r})
            print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "benchmark": "foundation",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "prompt": PROMPT,
        "tokens": args.tokens,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
