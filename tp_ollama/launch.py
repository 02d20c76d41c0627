"""The cluster's shape (`Cluster`, `--bootstrap`, `--tp-weights`) and starting the ranks of a one-shot
run with torchrun's machinery (torch.distributed.run's elastic agent and a static TCP rendezvous), on
one machine or many: each node runs the same command and node 0 hosts the rendezvous store. Serving
groups start another way (tp_ollama.engine.host, tp_ollama.membership), so that they can be formed
again when a node fails."""

from __future__ import annotations

import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tp_ollama.errors import ConfigError, TpOllamaError

DEFAULT_MASTER_PORT = 29511
STORE_LINGER_S = 2.0
# A worker that already printed its one-line error exits with this code, so nothing is said twice.
REPORTED_EXIT = 3


class ReportedError(TpOllamaError):
    """A rank failed and has already told the user why."""


@dataclass(frozen=True)
class Cluster:
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port (one node only)
    join_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes {self.nnodes} is invalid: expected at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is invalid: expected 0..{self.nnodes - 1}")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node {self.nproc_per_node} is invalid: expected at least 1")
        if self.nnodes > 1 and self.master_port == 0:
            raise ConfigError("several nodes need a fixed --master-port (or --bootstrap HOST:PORT) on every node")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def parse_bootstrap(value: str) -> tuple[str, int]:
    """`HOST:PORT` or the original design's multiaddr `/ip4/A.B.C.D/tcp/PORT` (also /dns4/NAME)."""
    m = re.fullmatch(r"/(?:ip4|ip6|dns4|dns6|dns)/([^/]+)/tcp/(\d+)/?", value)
    if m is None:
        m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", value)
    if m is None:
        raise ConfigError(f"--bootstrap {value!r} is invalid: expected HOST:PORT or /ip4/A.B.C.D/tcp/PORT")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ConfigError(f"--bootstrap port {port} is invalid: expected 1..65535")
    return m.group(1), port


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """--tp-weights `2,1,1`: each rank's relative share of the model."""
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--tp-weights {text!r} is invalid: expected numbers like 2,1,1") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_workers(cluster: Cluster, entrypoint: Any, *args: Any) -> dict[int, Any]:
    """Start this node's ranks and wait for them; a failed rank becomes one TpOllamaError line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cluster.master_port or free_port()
    config = LaunchConfig(
        min_nodes=cluster.nnodes,
        max_nodes=cluster.nnodes,
        nproc_per_node=cluster.nproc_per_node,
        run_id=f"tp-ollama-{port}" if cluster.nnodes > 1 else f"tp-ollama-{uuid.uuid4().hex[:8]}",
        rdzv_backend="static",
        rdzv_endpoint=f"{cluster.master_addr}:{port}",
        rdzv_configs={"rank": cluster.node_rank, "timeout": int(cluster.join_timeout_s)},
        max_restarts=0,
        monitor_interval=0.05,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, entrypoint)(*args)
        if cluster.nnodes > 1 and cluster.node_rank == 0:
            # Node 0's agent hosts the rendezvous store; staying up a moment lets the other
            # nodes' agents finish their exit barrier instead of finding the store gone.
            time.sleep(STORE_LINGER_S)
        return results
    except ChildFailedError as e:
        raise TpOllamaError(describe_failure(e)) from None
    except (RuntimeError, TimeoutError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TpOllamaError(
            f"the cluster did not form within {cluster.join_timeout_s:g} s at "
            f"{cluster.master_addr}:{port} ({cluster.nnodes} nodes expected): {text}"
        ) from None


def describe_failure(e: Any) -> str:
    """The first failed rank and why, unless that rank already printed its error."""
    rank, failure = e.get_first_failure()
    if failure.exitcode == REPORTED_EXIT:
        raise ReportedError(f"engine rank {rank} failed")
    raw = failure.message
    if isinstance(raw, dict):  # torch's error record: {"message": "...", "extraInfo": {traceback...}}
        raw = raw.get("message", "")
    lines = [line for line in str(raw or "").splitlines() if line.strip()]
    message = lines[0] if lines and "To enable traceback" not in lines[0] else f"exit code {failure.exitcode}"
    return f"engine rank {rank} failed: {message}"
