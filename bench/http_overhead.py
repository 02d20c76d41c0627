"""What the HTTP front end costs: time to first token and decode tok/s of the same greedy generation
in-process and through `tp-ollama serve` (streamed /api/generate, measured at the client), alternating.

    PYTHONPATH=. python bench/http_overhead.py                 # smollm2:135m, writes bench/results/http_overhead.json
    PYTHONPATH=. python bench/http_overhead.py --model gemma3:270m --tp 1 2
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
from typing import Any

import httpx
import torch

PROMPT = "Once upon a time, there was a little robot who"


def in_process(loaded: Any, tokens: int) -> dict[str, float]:
    from tp_ollama.engine.direct import generate_ids
    from tp_ollama.engine.options import GenerationOptions, SamplingOptions
    from tp_ollama.text.prompt import prompt_tokens

    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=tokens)
    t0 = time.perf_counter()
    ids = prompt_tokens(loaded.tokenizer, PROMPT)
    gen = generate_ids(loaded.model, ids, options, frozenset())
    next(gen)
    t1 = time.perf_counter()
    n = sum(1 for _ in gen)
    return {"ttft_s": t1 - t0, "decode_tok_s": n / (time.perf_counter() - t1)}


def over_http(url: str, model: str, tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "raw": True, "options": {"temperature": 0, "num_predict": tokens}}
    stamps: list[float] = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            chunk = json.loads(line)
            if not chunk["done"]:
                stamps.append(time.perf_counter())
    return {"ttft_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def start_server(tp: int, port: int, models: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OLLAMA_MODELS": models}
    cmd = [sys.executable, "-m", "tp_ollama", "serve", "--port", str(port), "--tp", str(tp)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


def main() -> None:
    from tp_ollama.completion import load
    from tp_ollama.launch import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--tp", type=int, nargs="+", default=[1])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "http_overhead.json"))
    args = ap.parse_args()

    loaded = load(args.model, torch.float32)
    servers = {}
    with tempfile.TemporaryDirectory() as models:
        try:
            for tp in args.tp:
                port = free_port()
                servers[tp] = (start_server(tp, port, models), f"http://127.0.0.1:{port}")
                over_http(servers[tp][1], args.model, 4)  # loads the model and warms the path
            runs: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.rounds):  # alternate so the machine's drift hits every target alike
                runs.setdefault("in-process", []).append(in_process(loaded, args.tokens))
                for tp, (_, url) in servers.items():
                    runs.setdefault(f"http tp={tp}", []).append(over_http(url, args.model, args.tokens))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    best = {k: max(v, key=lambda r: r["decode_tok_s"]) for k, v in runs.items()}
    base = best["in-process"]["decode_tok_s"]
    results = [
        {"target": k, **r, "decode_vs_in_process": r["decode_tok_s"] / base, "tries": runs[k]} for k, r in best.items()
    ]
    report = {
        "benchmark": "http",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "model": args.model,
        "tokens": args.tokens,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            r["target"],
            f"ttft {r['ttft_s']:.3f} s",
            f"{r['decode_tok_s']:.1f} tok/s",
            f"{r['decode_vs_in_process']:.3f}",
        )


if __name__ == "__main__":
    main()
