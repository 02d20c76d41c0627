"""Soak: 16 greedy streams for 5 minutes against three `tp-ollama launch` nodes on this machine
(loopback, the defaults), one node killed (kill -9 of its agent, which takes its ranks) every minute
and started again 20 s later with its original command. Every request either completes or ends with
an error: both are counted (with a few error messages), completed texts are checked against the
fault-free text of their prompt, and the resident memory of each node's processes is sampled.

    PYTHONPATH=. python bench/fault_soak.py [--model smollm2:135m] [--minutes 5]   # bench/results/fault_soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import psutil

HTTP, RDZV = 18493, 29593
URL = f"http://127.0.0.1:{HTTP}"
PROMPTS = [
    "Tell me a long story about a dragon.",
    "Describe the water cycle in detail.",
    "Write a poem about the sea.",
    "Explain how a bicycle works.",
]
OPTIONS = {"temperature": 0, "num_predict": 48}
STREAMS = 16


def launch(rank: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tp_ollama", "launch", "--nnodes", "3", "--node-rank", str(rank),
           "--master-port", str(RDZV)] + (["--port", str(HTTP)] if rank == 0 else [])  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def healthy() -> bool:
    try:
        s = httpx.get(URL + "/api/distributed/status", timeout=10).json()
    except httpx.TransportError:
        return False
    group = s["membership"]["replicas"][0]
    return s["state"] == "healthy" and group.get("nodes") == group.get("configured_nodes")


def wait_for(predicate, timeout_s: float = 240) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the cluster did not become healthy")
        time.sleep(0.2)


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    try:
        root = psutil.Process(proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 1e6
    except psutil.NoSuchProcess:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/fault_soak.json"))
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OLLAMA_HOST")}
    nodes = {r: launch(r, env) for r in (1, 2, 0)}
    counts = {"ok": 0, "errors": 0, "wrong_text": 0}
    samples: list[str] = []
    rss: list[dict] = []
    faults: list[dict] = []
    lock = threading.Lock()
    try:
        wait_for(healthy)
        with ollama.Client(host=URL, timeout=600) as client:
            reference = {p: client.generate(model=a.model, prompt=p, options=OPTIONS).response for p in PROMPTS}
        end = time.monotonic() + a.minutes * 60

        def worker(i: int) -> None:
            with ollama.Client(host=URL, timeout=600) as client:
                n = i
                while time.monotonic() < end:
                    prompt = PROMPTS[n % len(PROMPTS)]
                    n += 1
                    try:
                        text = "".join(
                            c.response for c in client.generate(a.model, prompt, options=OPTIONS, stream=True)
                        )
                        with lock:
                            counts["ok"] += 1
                            counts["wrong_text"] += text != reference[prompt]
                    except Exception as e:  # counted, never dropped
                        with lock:
                            counts["errors"] += 1
                            if len(samples) < 5:
                                samples.append(f"{type(e).__name__}: {e}"[:300])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        victim = 2
        next_fault, restart_at = t0 + 60, None
        while time.monotonic() < end:
            now = time.monotonic()
            if not rss or now - rss[-1]["t"] - t0 >= 10:
                rss.append({"t": round(now - t0, 1), **{f"node{r}_mb": round(rss_mb(p), 1) for r, p in nodes.items()}})
            if now >= next_fault and now < end - 25:
                os.killpg(nodes[victim].pid, signal.SIGKILL)
                faults.append({"t": round(now - t0, 1), "killed": victim})
                restart_at, next_fault = now + 20, now + 60
            if restart_at is not None and now >= restart_at:
                nodes[victim] = launch(victim, env)
                faults.append({"t": round(now - t0, 1), "restarted": victim})
                restart_at, victim = None, 3 - victim
            time.sleep(0.5)
        for t in threads:
            t.join(600)
        events = httpx.get(URL + "/api/distributed/events", timeout=30).json()
    finally:
        for p in nodes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in nodes.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    report = {
        "model": a.model, "cpus": os.cpu_count(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "streams": STREAMS, "minutes": a.minutes, "options": OPTIONS,
        "requests": counts, "error_samples": samples, "faults": faults, "rss_mb": rss,
        "counters": events["counters"],
    }  # fmt: skip
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb"}, indent=2))


if __name__ == "__main__":
    main()
