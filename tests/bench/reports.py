"""Bench reports of each kind built by hand with the report API, for the tests of the report, its schema and
its plots."""

from __future__ import annotations

from typing import Any

from tp_ollama.bench import report as rp


def _report(kind: str) -> dict[str, Any]:
    report = rp.new_report(kind, {"rounds": 3, "model": "tiny"}, argv=["tp-ollama", "bench", kind])
    report["machine"]["read_bandwidth_gbs"] = 20.0
    return report


def decode_report() -> dict[str, Any]:
    report = _report("decode")
    for tp, tok_s in ((1, 40.0), (2, 70.0)):
        rp.add_result(
            report, "tp-ollama", {"tp": tp, "dtype": "bf16", "gen_tokens": 64}, rounds=3,
            decode_tok_s=tok_s, decode_tok_s_rounds=[tok_s - 1, tok_s, tok_s + 1], prompt_tok_s=10 * tok_s,
            load_s=1.5, peak_rss_mb=[512.0] * tp,
            bandwidth={"bytes_per_token": [100_000_000 // tp] * tp, "achieved_gbs": [4.0] * tp, "fraction": [0.2] * tp},
            per_token_ms={"compute": 20.0 / tp, "communication": 1.0 * (tp - 1), "total": 1000 / tok_s},
            predicted_ms_per_token=1000 / tok_s * 1.1, measured_ms_per_token=1000 / tok_s, prediction_error=0.1,
            extra={"threads": 2},
        )  # fmt: skip
    return report


def serve_report() -> dict[str, Any]:
    report = _report("serve")
    for target, speed in (("tp-ollama", 1.0), ("llama-server", 1.25)):
        for concurrency in (1, 2, 4):
            rp.add_result(
                report, target, {"concurrency": concurrency, "gen_tokens": 32},
                ttft_s=rp.summarize([0.1 * concurrency / speed, 0.2 * concurrency / speed]),
                itl_s=rp.summarize([0.02 * concurrency / speed] * 5), request_s=rp.summarize([1.0, 2.0]),
                aggregate_tok_s=30.0 * concurrency * speed, requests={"ok": 8, "errors": 0, "timeouts": 0},
                error_samples=[], cold_start_s=None,
            )  # fmt: skip
    return report


def compare_report() -> dict[str, Any]:
    report = _report("compare")
    report["link"] = {"latency_us": 50.0, "bandwidth_gbs": 1.2, "method": "ping-pong",
                      "configured": {"delay_us": 50}}  # fmt: skip
    for target, tok_s in (("tp-ollama", 30.0), ("ollama", 40.0), ("llama.cpp", 50.0)):
        rp.add_result(report, target, {"quant": "q4_k_m"}, decode_tok_s=tok_s, ttft_s=rp.summarize([tok_s / 100]))
    rp.pairwise_ratios(report, ["decode_tok_s", "ttft_s"])
    report["notes"].append("vllm skipped: not installed")
    return report


def collectives_report() -> dict[str, Any]:
    report = _report("collectives")
    for backend in ("fastcomm", "gloo"):
        for op in ("all_reduce", "all_gather"):
            for size in (1024, 65536, 1 << 20):
                latency = (20.0 if backend == "fastcomm" else 60.0) * (2 if op == "all_gather" else 1) + size / 5000
                rp.add_result(
                    report, backend, {"op": op, "bytes": size, "ranks": 2}, rounds=20,
                    latency_us=rp.summarize([latency, latency * 1.1, latency * 1.5]),
                    bandwidth_gbs=size / latency / 1e3,
                )  # fmt: skip
    return report


REPORTS = {"decode": decode_report, "serve": serve_report, "compare": compare_report, "collectives": collectives_report}
