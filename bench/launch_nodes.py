"""Two `tp-ollama launch` nodes started on one machine (as two terminals of the original design's
quick start would) against `tp-ollama serve --tp 2` there, with the defaults: the decode rate a client
sees (eval_count / eval_duration of greedy /api/generate answers of 128 tokens), in alternating
rounds, each setup started fresh. The ranks of both setups find out at rendezvous that they share the
machine, split its cores and talk over shared memory, so the two should decode alike.

    PYTHONPATH=. python bench/launch_nodes.py [--model gemma3:270m] [--rounds 2]   # bench/results/launch_nodes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama

PORT, RDZV = 18434, 29533
URL = f"http://127.0.0.1:{PORT}"
PROMPT = "Tell me a story about a dragon."


def _wait(timeout_s: float = 180.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(URL + "/api/version", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no server answered at {URL} within {timeout_s:g} s")


def _rates(model: str, n: int) -> list[float]:
    client = ollama.Client(host=URL)
    client.generate(model, "Hello", options={"num_predict": 4})  # loads the model
    out = []
    for _ in range(n):
        reply = client.generate(model, PROMPT, options={"temperature": 0, "num_predict": 128})
        out.append(reply.eval_count / (reply.eval_duration / 1e9))
    return out


def _start(setup: str, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    cli = [sys.executable, "-m", "tp_ollama"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if setup == "serve --tp 2":
        return [subprocess.Popen([*cli, "serve", "--tp", "2", "--port", str(PORT)], **quiet)]  # type: ignore[call-overload]
    nodes = []
    for rank in (1, 0):
        cmd = [
            *cli,
            "launch",
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--master-port",
            str(RDZV),
            "--port",
            str(PORT),
        ]
        nodes.append(subprocess.Popen(cmd, **quiet))  # type: ignore[call-overload]
    return nodes


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    time.sleep(2)  # the ports free again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/launch_nodes.json"))
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    runs: dict[str, list[float]] = {"serve --tp 2": [], "two launch nodes": []}
    for _ in range(a.rounds):
        for setup in runs:
            procs = _start(setup, env)
            try:
                _wait()
                runs[setup] += _rates(a.model, 3)
            finally:
                _stop(procs)
            print(setup, [round(r, 1) for r in runs[setup]], flush=True)
    medians = {setup: statistics.median(r) for setup, r in runs.items()}
    report = {
        "model": a.model, "cpus": os.cpu_count(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "decode_tok_s": runs, "median_tok_s": medians,
        "ratio_launch_to_serve": medians["two launch nodes"] / medians["serve --tp 2"],
    }  # fmt: skip
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
