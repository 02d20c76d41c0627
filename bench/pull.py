"""Pull throughput from a registry on this machine (loopback): a minimal Ollama-protocol registry
serves the embedded gemma3:270m GGUF as a model; `tp-ollama serve` with an empty store pulls it
through /api/pull, against `curl` fetching the same blob to /dev/null (the transfer alone), in
alternating rounds. MB/s = blob bytes / seconds (powers of 1000).

    PYTHONPATH=. python bench/pull.py [--rounds 3]   # bench/results/pull.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry(weights: Path) -> tuple[Starlette, str, int]:
    h = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = f"sha256:{h.hexdigest()}"
    config = json.dumps({"model_format": "gguf", "model_family": "gemma3"}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    size = weights.stat().st_size
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": size}],
    }).encode()  # fmt: skip

    async def get_manifest(request: Request) -> Response:
        return Response(manifest, media_type=MANIFEST)

    async def blob(request: Request) -> Response:
        if request.path_params["digest"] == config_digest:
            return Response(config)
        return FileResponse(weights)  # Range requests too

    app = Starlette(routes=[Route("/v2/library/gemma3/manifests/bench", get_manifest),
                            Route("/v2/library/gemma3/blobs/{digest}", blob)])  # fmt: skip
    return app, digest, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/pull.json"))
    a = ap.parse_args()
    from tp_ollama.store.embedded import gemma3_270m

    weights = Path(gemma3_270m())
    app, digest, size = registry(weights)
    reg_port, http_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=reg_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    blob_url = f"http://127.0.0.1:{reg_port}/v2/library/gemma3/blobs/{digest}"
    name = f"127.0.0.1:{reg_port}/library/gemma3:bench"
    rates: dict[str, list[float]] = {"curl": [], "tp-ollama /api/pull": []}
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", blob_url], check=True)
        rates["curl"].append(size / (time.perf_counter() - t0) / 1e6)
        store = Path(tempfile.mkdtemp(prefix="tpo-pull-"))
        env = {**os.environ, "OLLAMA_MODELS": str(store)}
        env.pop("OLLAMA_HOST", None)
        proc = subprocess.Popen([sys.executable, "-m", "tp_ollama", "serve", "--port", str(http_port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{http_port}"
            while True:
                try:
                    httpx.get(url, timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            t0 = time.perf_counter()
            r = httpx.post(url + "/api/pull", json={"model": name, "insecure": True, "stream": False}, timeout=600)
            elapsed = time.perf_counter() - t0
            assert r.json() == {"status": "success"}, r.text
            rates["tp-ollama /api/pull"].append(size / elapsed / 1e6)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            shutil.rmtree(store, ignore_errors=True)
        print({k: [round(x) for x in v] for k, v in rates.items()}, flush=True)
    server.should_exit = True
    medians = {k: statistics.median(v) for k, v in rates.items()}
    report = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "blob_bytes": size, "mb_s": rates, "median_mb_s": medians,
        "ratio_pull_to_curl": medians["tp-ollama /api/pull"] / medians["curl"],
    }  # fmt: skip
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
