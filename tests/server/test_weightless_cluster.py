"""Two `tp-ollama launch` nodes on this machine, each with its own store and cache (as two machines
would have), and a model that only node 0 pulls (from the registry double, tests/store/registry_double.py):

- node 1's rank reads its slices from node 0: the answer is the text of `tp-ollama generate` on the
  GGUF file itself, and node 1 received and keeps less than 70% of the file, none of it in its store;
- node 1 restarted with its command: its rank loads from its own cache, node 0 sends nothing more;
- /api/distributed/models says where each rank's weights came from and what node 0 sent.

The cluster runs tensor-parallel (each node a share of every layer) and layer-wise (`--pp 2`: each node
a stage of half the layers): the same answers, and node 1 receives only what its part reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ollama
import pytest

from tests.server.conftest import serving
from tests.store.registry_double import RegistryDouble, digest_of
from tests.waits import wait_until
from tp_ollama.launch import free_port
from tp_ollama.store.embedded import resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("weightless-cluster")]

SECRET = "weightless-secret"
PROMPT = "The capital of France is"
NUM_PREDICT = 12
STARTUP_S = 180


@dataclass
class Node:
    store: Path
    cache: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    url: str
    port: int
    registry: str
    weights: bytes
    logs: Path
    flags: list[str] = field(default_factory=list)  # how the model is split: [] (tensor) or ["--pp", "2"]
    nodes: dict[int, Node] = field(default_factory=dict)

    def start(self, rank: int) -> None:
        node = self.nodes[rank]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OLLAMA_MODELS": str(node.store),
               "TP_OLLAMA_CACHE": str(node.cache), "TP_OLLAMA_CLUSTER_SECRET": SECRET}  # fmt: skip
        env.pop("OLLAMA_HOST", None)
        cmd = [sys.executable, "-m", "tp_ollama", "launch", "--nnodes", "2", "--node-rank", str(rank),
               "--master-port", str(self.port), *self.flags]  # fmt: skip
        if rank == 0:
            cmd += ["--port", self.url.rsplit(":", 1)[1]]
        with (self.logs / f"node{rank}.log").open("a") as log:
            node.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, rank: int) -> None:
        proc = self.nodes[rank].proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def two_nodes(self) -> bool:
        try:
            s = httpx.get(f"{self.url}/api/distributed/status", timeout=30).json()
        except httpx.HTTPError:
            return False
        return s["state"] == "healthy" and s["membership"]["replicas"][0]["nodes"] == 2

    def models(self) -> dict:
        """The loaded model's view, with what node 0 sent each node (`sent`)."""
        body = httpx.get(f"{self.url}/api/distributed/models", timeout=60).json()
        return {**body["models"][0], "sent": body["sent"]}


@pytest.fixture(scope="module", params=["tensor", "layerwise"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("weightless")
    # The embedded SmolLM2 with bytes added after its tensors: the same model, a file no store has.
    weights = resolve_model("smollm2:135m").read_bytes() + b"\0" * 64
    double = RegistryDouble()
    double.add_model("library", "smol", "q4", weights)
    with serving(double.app()) as registry:
        flags = ["--pp", "2"] if request.param == "layerwise" else []
        c = Cluster(
            f"http://127.0.0.1:{free_port()}", free_port(), registry.removeprefix("http://"), weights, root, flags
        )
        for rank in (0, 1):
            c.nodes[rank] = Node(root / f"store{rank}", root / f"cache{rank}")
            c.nodes[rank].store.mkdir()
        try:
            c.start(1)
            c.start(0)
            wait_until(c.two_nodes, STARTUP_S, what="both nodes in one group")
            yield c
        finally:
            for rank in (0, 1):
                c.kill(rank)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What one process generates from the GGUF file itself."""
    path = tmp_path_factory.mktemp("file") / "smol.gguf"
    path.write_bytes(resolve_model("smollm2:135m").read_bytes() + b"\0" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "tp_ollama", "generate", str(path), PROMPT, "--temperature", "0",
         "--num-predict", str(NUM_PREDICT)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout, done.stderr
    return done.stdout


def generate(cluster: Cluster, name: str) -> str:
    with ollama.Client(host=cluster.url, timeout=300) as client:
        out = client.generate(name, PROMPT, raw=True, options={"temperature": 0, "num_predict": NUM_PREDICT})
    assert out.eval_count == NUM_PREDICT
    return out.response


def cached_bytes(cache: Path) -> int:
    """Disk taken by partial model files under a node's cache (sparse files: allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in (cache / "slices").rglob("data"))


def test_a_model_only_node_0_has_is_served_with_node_1_reading_its_slices(cluster: Cluster, reference: str):
    name = f"{cluster.registry}/library/smol:q4"
    with ollama.Client(host=cluster.url, timeout=300) as client:
        assert client.pull(name, insecure=True).status == "success"
    assert generate(cluster, name) == reference
    size, digest = len(cluster.weights), digest_of(cluster.weights)
    model = cluster.models()
    assert model["files"] == [{"name": f"sha256-{digest.removeprefix('sha256:')}", "digest": digest, "size": size}]
    rank0, rank1 = (entry["weights"] for entry in model["layout"])
    if cluster.flags:  # a stage each: node 1 holds the last 11 of 30 layers and the head
        assert [entry["layers"] for entry in model["layout"]] == [[0, 19], [19, 30]]  # the head counts as 8 layers
    assert rank0["weights"] == "store" and rank0["node"] == 0
    assert rank1["weights"] == "node 0" and rank1["node"] == 1
    assert 0 < rank1["received_bytes"] < 0.7 * size
    sent = [s for s in model["sent"] if s["node"] == 1 and s["file"] == digest]
    assert sent and sent[0]["bytes_sent"] == rank1["received_bytes"]
    assert 0 < cached_bytes(cluster.nodes[1].cache) < 0.7 * size
    blobs = cluster.nodes[1].store / "blobs"
    assert not blobs.exists() or not list(blobs.glob("sha256-*"))  # slices only, no copy of the file


def test_a_restarted_node_loads_its_slices_from_its_cache(cluster: Cluster, reference: str):
    name = f"{cluster.registry}/library/smol:q4"
    digest = digest_of(cluster.weights)
    sent_before = sum(s["bytes_sent"] for s in cluster.models()["sent"] if s["node"] == 1)
    cluster.kill(1)
    wait_until(lambda: not cluster.two_nodes(), 60, what="node 0 seeing node 1 gone")
    cluster.start(1)
    wait_until(cluster.two_nodes, STARTUP_S, what="node 1 back in the group")
    assert generate(cluster, name) == reference
    model = cluster.models()
    rank1 = model["layout"][1]["weights"]
    assert rank1["weights"] == "cache" and rank1["received_bytes"] == 0
    assert sum(s["bytes_sent"] for s in model["sent"] if s["node"] == 1 and s["file"] == digest) == sent_before
