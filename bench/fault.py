"""Failures while serving, as a user meets them, with the defaults: three `tp-ollama launch` nodes on
this machine (loopback) and `tp-ollama serve --tp 2`, greedy streams of 64 tokens from the Ollama API.

For each model:
- decode tok/s (eval_count / eval_duration) before any failure, while degraded (a node lost: its rank
  runs on a survivor) and after the node rejoined;
- kill -9 of a whole node (agent, host, rank) after 10 tokens of a stream: seconds from the kill to
  the next token, and whether the text is the fault-free one;
- the killed node started again during a stream: seconds from its start to the group at three nodes,
  and the stream's longest gap (the group stops between two steps to grow, and the stream replays);
- SIGSTOP of one rank after 10 tokens: seconds to the next token (detected from /proc, fenced out);
- serve --tp 2, kill -9 of rank 1 after 10 tokens: seconds to the next token.

    PYTHONPATH=. python bench/fault.py [--model gemma3:270m --model smollm2:135m]   # bench/results/fault.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import psutil

HTTP, RDZV = 18491, 29591
URL = f"http://127.0.0.1:{HTTP}"
PROMPT = "Tell me a long story about a dragon."
OPTIONS = {"temperature": 0, "num_predict": 64}
CLI = [sys.executable, "-m", "tp_ollama"]


def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = 240.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def answers() -> bool:
    try:
        return httpx.get(URL + "/api/version", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def status() -> dict:
    return httpx.get(URL + "/api/distributed/status", timeout=30).json()


def nodes_up() -> int:
    return int(status()["membership"]["replicas"][0].get("nodes", 1))


def healthy() -> bool:
    s = status()
    group = s["membership"]["replicas"][0]
    return s["state"] == "healthy" and group.get("nodes", 1) == group.get("configured_nodes", 1)


def stream(model: str, at_token: int | None = None, fault: Callable[[], None] | None = None) -> dict:
    """A greedy stream; `fault` runs when `at_token` tokens have arrived. Its text, the seconds from the
    fault to the next token, its longest gap, and its decode rate."""
    times, pieces, fault_at = [], [], None
    with ollama.Client(host=URL, timeout=600) as client:
        for chunk in client.generate(model=model, prompt=PROMPT, options=OPTIONS, stream=True):
            times.append(time.monotonic())
            pieces.append(chunk.response)
            if fault is not None and len(times) == at_token:
                fault_at = time.monotonic()
                fault()
            final = chunk
    gaps = [b - a for a, b in itertools.pairwise(times)]
    after = next((t for t in times if fault_at is not None and t > fault_at), None)
    return {
        "text": "".join(pieces),
        "to_next_token_s": None if after is None or fault_at is None else after - fault_at,
        "longest_gap_s": max(gaps) if gaps else 0.0,
        "tok_s": final.eval_count / (final.eval_duration / 1e9) if final.eval_duration else None,
    }


def rates(model: str, n: int = 3) -> list[float]:
    return [r for r in (stream(model)["tok_s"] for _ in range(n)) if r is not None]


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    tree = []
    for p in procs:
        try:
            tree += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(2)  # the ports free again


def running_ranks(node: subprocess.Popen[bytes]) -> list[psutil.Process]:
    hosts = [p for p in psutil.Process(node.pid).children() if p.children()]
    return [r for h in hosts for r in h.children()]


def cluster_run(model: str, env: dict[str, str]) -> dict:
    def launch(rank: int) -> subprocess.Popen[bytes]:
        cmd = [*CLI, "launch", "--nnodes", "3", "--node-rank", str(rank), "--master-port", str(RDZV)]
        return start(cmd + (["--port", str(HTTP)] if rank == 0 else []), env)

    nodes = {r: launch(r) for r in (1, 2, 0)}
    try:
        wait_for("node 0 serving", answers)
        wait_for("three nodes in one group", healthy)
        reference = stream(model)["text"]
        before = rates(model)

        killed = stream(model, 10, lambda: os.killpg(nodes[2].pid, signal.SIGKILL))
        during = rates(model)

        rejoin: dict = {}

        def restart() -> None:
            rejoin["started"] = time.time()
            nodes[2] = launch(2)

        rejoined = stream(model, 10, restart)
        wait_for("the group back at three nodes", healthy)
        events = httpx.get(URL + "/api/distributed/events", timeout=30).json()["events"]
        formed = next(e["time"] for e in events if e["kind"] == "formed" and e["time"] > rejoin["started"]
                      and len(e["nodes"]) == 3)  # fmt: skip
        rejoin = {
            "to_group_of_three_s": formed - rejoin.pop("started"),
            "stream_longest_gap_s": rejoined["longest_gap_s"],
            "same_text": rejoined["text"] == reference,
        }
        after = rates(model)

        wait_for("healthy", healthy)
        (rank,) = running_ranks(nodes[1])
        stopped = stream(model, 10, lambda: rank.send_signal(signal.SIGSTOP))
        events = httpx.get(URL + "/api/distributed/events", timeout=30).json()
        return {
            "decode_tok_s": {"before": before, "degraded": during, "after_rejoin": after},
            "median_tok_s": {
                "before": statistics.median(before),
                "degraded": statistics.median(during),
                "after_rejoin": statistics.median(after),
            },
            "kill_node": {
                "to_next_token_s": killed["to_next_token_s"],
                "longest_gap_s": killed["longest_gap_s"],
                "same_text": killed["text"] == reference,
            },
            "rejoin": rejoin,
            "sigstop_rank": {
                "to_next_token_s": stopped["to_next_token_s"],
                "same_text": stopped["text"] == reference,
            },
            "counters": events["counters"],
        }
    finally:
        stop(list(nodes.values()))


def serve_run(model: str, env: dict[str, str]) -> dict:
    server = start([*CLI, "serve", "--tp", "2", "--port", str(HTTP)], env)
    try:
        wait_for("the server", answers)
        reference = stream(model)["text"]
        (rank1,) = [r for r in running_ranks(server) if r.pid == max(p.pid for p in running_ranks(server))]
        killed = stream(model, 10, rank1.kill)
        return {
            "to_next_token_s": killed["to_next_token_s"],
            "longest_gap_s": killed["longest_gap_s"],
            "same_text": killed["text"] == reference,
        }
    finally:
        stop([server])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fault.json"))
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OLLAMA_HOST")}
    report: dict = {"cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                    "prompt": PROMPT, "options": OPTIONS, "models": {}}  # fmt: skip
    for model in a.model or ["gemma3:270m", "smollm2:135m"]:
        report["models"][model] = {
            "three_launch_nodes": cluster_run(model, env),
            "serve_tp2_kill_rank": serve_run(model, env),
        }
        print(json.dumps(report["models"][model], indent=2), flush=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
