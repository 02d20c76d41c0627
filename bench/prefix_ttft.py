"""What prefix reuse buys a chat: time to first token of a second turn whose history (system prompt,
first question, first answer) is about 500 tokens, against the first turn's, through `tp-ollama serve`
(streamed /api/chat, measured at the client). The second turn's history is already in the KV cache's
blocks, so only its new tokens are prefilled.

    PYTHONPATH=. python bench/prefix_ttft.py [--model gemma3:270m] [--tp 1]   # bench/results/prefix_ttft.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.http_overhead import start_server

TOPICS = ["rivers", "volcanoes", "bridges", "comets", "forests"]


def ttft(url: str, model: str, messages: list[dict[str, str]]) -> tuple[float, str, int]:
    """(seconds to the first content chunk, the whole reply, prompt_eval_count)."""
    body = {"model": model, "messages": messages, "options": {"temperature": 0, "num_predict": 48}}
    t0 = time.perf_counter()
    first, text, prompt = None, [], 0
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=600) as r:
        for line in r.iter_lines():
            chunk = json.loads(line)
            if first is None and not chunk["done"]:
                first = time.perf_counter() - t0
            text.append(chunk.get("message", {}).get("content", ""))
            prompt = chunk.get("prompt_eval_count", prompt)
    assert first is not None
    return first, "".join(text), prompt


def main() -> None:
    from tp_ollama.launch import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefix_ttft.json"))
    args = ap.parse_args()
    port = free_port()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as models:
        proc = start_server(args.tp, port, models)
        url = f"http://127.0.0.1:{port}"
        try:
            ttft(url, args.model, [{"role": "user", "content": "Hello"}])  # load the model
            for topic in TOPICS:
                system = f"You are a geography teacher. Today's lesson is about {topic}. " * 30
                first = [{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about {topic}."}]
                t1, answer, n1 = ttft(url, args.model, first)
                second = [*first, {"role": "assistant", "content": answer},
                          {"role": "user", "content": "Give one famous example."}]  # fmt: skip
                t2, _, n2 = ttft(url, args.model, second)
                runs.append({"topic": topic, "turn1_prompt_tokens": n1, "turn1_ttft_s": t1,
                             "turn2_prompt_tokens": n2, "turn2_ttft_s": t2, "ratio": t2 / t1})  # fmt: skip
                print(runs[-1])
            metrics = httpx.get(f"{url}/api/distributed/metrics", timeout=30).json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ratio = statistics.median(r["ratio"] for r in runs)
    result = {"model": args.model, "tp": args.tp, "machine": platform.machine(), "runs": runs,
              "ratio_median": ratio, "kv_cache": metrics.get("kv_cache")}  # fmt: skip
    print("median turn-2 / turn-1 TTFT:", round(result["ratio_median"], 3))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
