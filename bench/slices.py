"""Weightless workers: what a node without the model pays at load. Two `tp-ollama launch` nodes on
this machine (loopback), each with its own store and cache; node 0 pulls a model (the embedded
gemma3:270m GGUF with bytes appended, so no store has it) from a registry on this machine; the first
request loads it: node 0's rank reads its slices from its own file, node 1's rank receives its slices
from node 0. Then node 1 is restarted and loads again from its cache. Every round starts from empty
stores and caches. Figures per rank from /api/distributed/models (`read_seconds`: open, read, pack;
`fetch_seconds`: waiting for node 0's bytes and writing them).

    PYTHONPATH=. python bench/slices.py [--rounds 3]   # bench/results/slices.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bench.pull import free_port, registry

SECRET = "bench-slices"


class Cluster:
    def __init__(self, root: Path, reg_port: int) -> None:
        self.root, self.reg_port = root, reg_port
        self.port, self.http = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, rank: int) -> None:
        env = {**os.environ, "OLLAMA_MODELS": str(self.root / f"store{rank}"),
               "TP_OLLAMA_CACHE": str(self.root / f"cache{rank}"), "TP_OLLAMA_CLUSTER_SECRET": SECRET}  # fmt: skip
        env.pop("OLLAMA_HOST", None)
        cmd = [sys.executable, "-m", "tp_ollama", "launch", "--nnodes", "2", "--node-rank", str(rank),
               "--master-port", str(self.port)] + (["--port", str(self.http)] if rank == 0 else [])  # fmt: skip
        log = (self.root / f"node{rank}.log").open("a")
        self.procs[rank] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self, rank: int) -> None:
        proc = self.procs[rank]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def nodes(self) -> int:
        try:
            s = httpx.get(f"{self.url}/api/distributed/status", timeout=10).json()
        except httpx.HTTPError:
            return 0
        return int(s["membership"]["replicas"][0]["nodes"]) if s["state"] == "healthy" else 0

    def wait_nodes(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.nodes() != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {n} healthy node(s) in {timeout:g} s")
            time.sleep(0.5)

    def load(self, name: str) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
        """Load through a one-token request: (seconds to the answer, each rank's weights facts, sent)."""
        t0 = time.perf_counter()
        body = {"model": name, "prompt": "hi", "raw": True, "stream": False,
                "options": {"num_predict": 1, "temperature": 0}}  # fmt: skip
        r = httpx.post(f"{self.url}/api/generate", json=body, timeout=900)
        r.raise_for_status()
        elapsed = time.perf_counter() - t0
        body = httpx.get(f"{self.url}/api/distributed/models", timeout=60).json()
        return elapsed, [entry["weights"] for entry in body["models"][0]["layout"]], body["sent"]

    def close(self) -> None:
        for rank in list(self.procs):
            self.kill(rank)


def one_round(weights: Path, reg_port: int, name: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tpo-slices-"))
    c = Cluster(root, reg_port)
    try:
        c.start(1)
        c.start(0)
        c.wait_nodes(2)
        r = httpx.post(f"{c.url}/api/pull", json={"model": name, "insecure": True, "stream": False}, timeout=900)
        assert r.json() == {"status": "success"}, r.text
        first_s, first, sent = c.load(name)
        c.kill(1)
        c.wait_nodes(0, 60)  # degraded: not healthy until node 1 is back
        c.start(1)
        c.wait_nodes(2)
        _, again, sent_again = c.load(name)  # the group re-formed and loaded again with node 1 in it
        return {
            "first_request_s": first_s, "first_load": first, "after_restart": again,
            "node1_bytes_sent_first": sum(s["bytes_sent"] for s in sent if s["node"] == 1),
            "node1_bytes_sent_after_restart": sum(s["bytes_sent"] for s in sent_again if s["node"] == 1)
            - sum(s["bytes_sent"] for s in sent if s["node"] == 1),
        }  # fmt: skip
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/slices.json"))
    a = ap.parse_args()
    from tp_ollama.store.embedded import gemma3_270m

    work = Path(tempfile.mkdtemp(prefix="tpo-slices-model-"))
    weights = work / "gemma3-270m-other.gguf"
    weights.write_bytes(Path(gemma3_270m()).read_bytes() + b"\0" * 64)
    app, _, size = registry(weights)
    reg_port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=reg_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    name = f"127.0.0.1:{reg_port}/library/gemma3:bench"
    rounds = []
    try:
        for _ in range(a.rounds):
            rounds.append(one_round(weights, reg_port, name))
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        server.should_exit = True
        shutil.rmtree(work, ignore_errors=True)

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rounds)

    summary = {
        "node0_read_local_file_s": med(lambda r: r["first_load"][0]["read_seconds"]),
        "node1_read_streamed_s": med(lambda r: r["first_load"][1]["read_seconds"]),
        "node1_fetch_s": med(lambda r: r["first_load"][1]["fetch_seconds"]),
        "node1_received_bytes": med(lambda r: r["first_load"][1]["received_bytes"]),
        "node1_received_fraction": med(lambda r: r["first_load"][1]["received_bytes"]) / size,
        "node1_cached_fraction": med(lambda r: r["first_load"][1]["cached_bytes"]) / size,
        "node1_fetch_mb_s": med(lambda r: r["first_load"][1]["received_bytes"] / 1e6
                                / max(r["first_load"][1]["fetch_seconds"], 1e-3)),
        "node1_read_after_restart_s": med(lambda r: r["after_restart"][1]["read_seconds"]),
        "node1_bytes_sent_after_restart": med(lambda r: r["node1_bytes_sent_after_restart"]),
        "first_request_s": med(lambda r: r["first_request_s"]),
    }  # fmt: skip
    report = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "model": "gemma3:270m Q4_K_M (+64 bytes)", "file_bytes": size, "nodes": 2, "link": "loopback",
        "rounds": rounds, "median": summary,
    }  # fmt: skip
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
