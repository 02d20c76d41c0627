"""What structured outputs cost while decoding: decode tok/s of the same chat request with no format,
format "json" and a JSON Schema, through `tp-ollama serve --tp N` (the engine's own eval_count /
eval_duration), alternating the three so the machine's drift hits all alike. At TP=2 every step also
broadcasts the grammar's bitmask (vocabulary / 8 bytes: 32 KB for gemma3's 262k tokens).

    PYTHONPATH=. python bench/structured_decode.py --tp 1 2    # writes bench/results/structured_decode.json
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

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "skills": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "skills"],
}
FORMATS: dict[str, Any] = {"none": None, "json": "json", "schema": SCHEMA}
ASK = "Describe a made-up person as JSON with a name, an age and a list of skills."


def one(url: str, model: str, fmt: Any, tokens: int) -> dict[str, float]:
    # Sampled at a fixed seed with num_predict as the bound: every variant decodes `tokens` steps
    # unless the model ends earlier, which the eval_count in the record shows.
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": ASK}], "stream": False,
                            "options": {"temperature": 0.7, "seed": 1, "num_predict": tokens}}  # fmt: skip
    if fmt is not None:
        body["format"] = fmt
    t0 = time.perf_counter()
    reply = httpx.post(f"{url}/api/chat", json=body, timeout=600).json()
    wall = time.perf_counter() - t0
    return {"decode_tok_s": reply["eval_count"] / (reply["eval_duration"] / 1e9), "eval_count": reply["eval_count"],
            "total_s": wall}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["smollm2:135m", "gemma3:270m"])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured_decode.json"))
    args = ap.parse_args()
    results: dict[str, Any] = {"tokens": args.tokens, "machine": platform.machine(), "models": {}}
    for model in args.model:
        results["models"][model] = {str(tp): run_tp(model, tp, args.tokens, args.rounds) for tp in args.tp}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def run_tp(model: str, tp: int, tokens: int, rounds: int) -> dict[str, Any]:
    from tp_ollama.launch import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as models:
        proc = start_server(tp, port, models)
        url = f"http://127.0.0.1:{port}"
        try:
            for fmt in FORMATS.values():  # warm: load, the grammar vocabulary, the first compile
                one(url, model, fmt, 8)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in FORMATS}
            for _ in range(rounds):
                for name, fmt in FORMATS.items():
                    runs[name].append(one(url, model, fmt, tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    entry = {name: {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rs),
                    "eval_counts": [int(r["eval_count"]) for r in rs]} for name, rs in runs.items()}  # fmt: skip
    base = entry["none"]["decode_tok_s_median"]
    for name in ("json", "schema"):
        entry[name]["vs_none"] = entry[name]["decode_tok_s_median"] / base
    print(model, f"tp={tp}", json.dumps(entry))
    return entry


if __name__ == "__main__":
    main()
