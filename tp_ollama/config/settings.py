"""The settings: a frozen dataclass tree with every key, its default and its kind of value.

Sections follow the original "distributed Ollama" design's config.yaml (configs/default.yaml lists
every key); keys of that design that tp-ollama does not implement are accepted, listed in
NOT_IMPLEMENTED with the reason, and reported by `Settings.notes()` when set to anything but their
default. tp_ollama.config.loading fills the tree from a file, the environment and flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from tp_ollama.config.kinds import Bool, Directory, Duration, Host, Int, Kind, List, Size, Str, opt
from tp_ollama.config.values import DEFAULT_PORT, client_url, format_duration, format_size, host_port
from tp_ollama.launch import DEFAULT_MASTER_PORT, Cluster

MIB = 1024 * 1024
# Kept in step with tp_ollama.parallel.comm.COMM_KINDS (a test compares them); importing it here
# would import torch just to read a config file.
COMM_KINDS = ("auto", "shm", "tcp", "gloo", "nccl")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_MODES = ("none", "int8", "int4", "auto")
# Ollama's built-in CORS origins; OLLAMA_ORIGINS / api.origins are appended to these.
DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    *("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"),
)

# Accepted for compatibility with the original design's config.yaml, but without effect (yet).
NOT_IMPLEMENTED: dict[str, str] = {
    "cluster.discovery": "not implemented: the rendezvous is static (every node is given node 0's address)",
    "inference.aggregation": "no-op: tensor-parallel ranks all-reduce partial sums; there are no partial answers",
    "models.replication.max_replicas": "not implemented: min_replicas groups are started and none are added under load",
    "models.replication.strategy": "not implemented: every replica runs on this node (node 0)",
    "performance.caching.ttl": "not implemented: cached prefix blocks stay until evicted (least recently used first)",
}


def _origin(x: Any) -> str:
    """One of api.origins: non-empty text."""
    if not isinstance(x, str) or not x.strip():
        raise ValueError(x)
    return x.strip()


def _weight(x: Any) -> float:
    """One rank's share in inference.tp_weights: a positive, finite number."""
    if isinstance(x, bool) or not isinstance(x, int | float | str) or not 0 < float(x) < math.inf:
        raise ValueError(x)
    return float(x)


def default_cache_dir() -> Path:
    """Where converted tokenizers and packed weights are kept: `$TP_OLLAMA_CACHE`, else
    `~/.cache/tp-ollama`."""
    configured = os.environ.get("TP_OLLAMA_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "tp-ollama"


def _store_dir(x: Any) -> Path:
    """One of models.extra_stores: an existing directory in Ollama's layout (it has `manifests/`)."""
    if not isinstance(x, str | Path) or not str(x).strip():
        raise ValueError(x)
    path = Path(str(x).strip()).expanduser().absolute()
    if not (path / "manifests").is_dir():
        raise ValueError(x)
    return path


def _default_models_dir() -> Path:
    return Path("~/.ollama/models").expanduser()


# ---- the settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiSettings:
    host: str = opt("127.0.0.1", Host())
    port: int = opt(DEFAULT_PORT, Int(0, 65535, "0: any free port"))
    origins: tuple[str, ...] = opt((), List(_origin, "a list of origins such as chrome-extension://*"))
    max_body_bytes: int = opt(64 * MIB, Size(lo=1024))
    request_timeout: float = opt(60.0, Duration(0, note="0: no limit"))

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return DEFAULT_ORIGINS + self.origins

    def client_url(self) -> str:
        return client_url(self.host, self.port)


@dataclass(frozen=True)
class Discovery:
    enabled: bool = opt(False, Bool())
    interval: float = opt(30.0, Duration(0, strict=True))


@dataclass(frozen=True)
class ClusterSettings:
    rendezvous_addr: str = opt("127.0.0.1", Host())
    rendezvous_port: int = opt(DEFAULT_MASTER_PORT, Int(0, 65535, "0: any free port, one node only"))
    nnodes: int = opt(1, Int(1))
    node_rank: int = opt(0, Int(0))
    nproc_per_node: int = opt(1, Int(1))
    join_timeout: float = opt(120.0, Duration(0, strict=True))
    comm: str = opt("auto", Str(COMM_KINDS))
    # Several nodes: the fewest that keep serving after failures (requests wait, within
    # inference.fault_tolerance.retry_timeout, while fewer are up).
    min_nodes: int = opt(1, Int(1))
    # Several nodes: the shared secret every node proves on the rendezvous and mesh connections
    # (else TP_OLLAMA_CLUSTER_SECRET; node 0 generates one and saves it when neither is set).
    secret: str = opt("", Str(empty_ok=True))
    discovery: Discovery = field(default_factory=Discovery)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def launch_cluster(self) -> Cluster:
        """The launcher's view of this section."""
        return Cluster(
            self.nnodes,
            self.node_rank,
            self.nproc_per_node,
            self.rendezvous_addr,
            self.rendezvous_port,
            self.join_timeout,
        )


@dataclass(frozen=True)
class Partitioning:
    """How a group's ranks split the model: `tensor` (every rank a share of every layer), `layerwise`
    (pipeline stages of contiguous layers, tp_ollama.parallel.pipeline; `pp` stages, default one per
    rank), `hybrid` (`pp` stages, default one per node, each split by tensor parallelism among its
    ranks), `auto` (at each load, the cost model's fastest over the link measured then).
    `pp` > 1 (flag --pp) means stages whatever `strategy` says: TP inside them when the world size is
    a multiple."""

    strategy: str = opt("tensor", Str(("tensor", "layerwise", "hybrid", "auto")))
    pp: int = opt(1, Int(1, note="pipeline stages; the world size is tp x pp"))
    pp_weights: tuple[float, ...] = opt(
        (), List(_weight, "a list of positive numbers, one per pipeline stage, e.g. [2, 1]")
    )
    # The most weight bytes one rank may hold (a node's memory for the model); a load whose part is
    # bigger fails, naming the sizes; `auto` only picks a split that fits. 0: no limit.
    memory_budget: int = opt(0, Size())
    max_partitions: int = opt(0, Int(0, note="the largest world size allowed; 0: no limit"))

    def stages(self, world_size: int, nnodes: int = 1) -> int:
        """Pipeline stages of a group of `world_size` ranks on `nnodes` nodes (1: tensor parallel)."""
        if self.pp > 1:
            return self.pp
        if self.strategy == "hybrid":
            return nnodes
        return world_size if self.strategy == "layerwise" else 1


@dataclass(frozen=True)
class Aggregation:
    strategy: str = opt("concat", Str())


@dataclass(frozen=True)
class LoadBalancing:
    """How requests are spread over the replicas (models.replication.min_replicas engine groups):
    least_loaded sends each to the replica with the fewest requests running (ties: the lowest index),
    round_robin to the next one in turn that has a free slot. `enabled` false needs one replica."""

    enabled: bool = opt(True, Bool())
    algorithm: str = opt("least_loaded", Str(("least_loaded", "round_robin")))


@dataclass(frozen=True)
class FaultTolerance:
    """An engine group that dies (a rank killed or crashed, a node lost) is formed again on the ranks
    and nodes still up, and its interrupted requests replayed, each up to retry_attempts times, within
    retry_timeout of the failure (tp_ollama.server.engine_client). A node silent for detect_timeout
    (hung, its link cut) counts as lost (tp_ollama.membership)."""

    enabled: bool = opt(True, Bool())
    retry_attempts: int = opt(3, Int(0))
    detect_timeout: float = opt(5.0, Duration(0, strict=True))
    retry_timeout: float = opt(60.0, Duration(0, strict=True))
    # Several nodes, a node lost: false keeps every rank (its ranks move to the nodes up, so the
    # layout and the arithmetic, hence the text, stay those of the whole cluster); true re-forms a
    # smaller group of the nodes' own ranks (a new layout: faster on equal nodes, and the text after
    # the failure may differ where two tokens were nearly tied).
    reshard: bool = opt(False, Bool())


@dataclass(frozen=True)
class InferenceSettings:
    # Requests generating at once per engine group (replica); the engine batches them into one
    # decode step. 4 by default: a decode step reads every weight once whatever the batch, so a few
    # sequences cost little more than one, and 4 full-length sequences (num_ctx 4096) of an 8B Llama
    # in bfloat16 take 2 GiB of KV cache, the default performance.caching.size. Upstream Ollama
    # defaults to 1 per model (4 in older versions); vLLM to 256, sized for large GPUs.
    max_concurrent: int = opt(4, Int(1))
    max_queue: int = opt(512, Int(1))
    timeout: float = opt(300.0, Duration(0, note="0: no limit"))
    keep_alive: float = opt(300.0, Duration(note="negative: forever, 0: unload after each request"))
    num_ctx: int = opt(4096, Int(1))
    max_num_ctx: int = opt(131072, Int(1))
    max_num_predict: int = opt(-1, Int(-1, note="-1: no bound but num_ctx"))
    partitioning: Partitioning = field(default_factory=Partitioning)
    tp_weights: tuple[float, ...] = opt((), List(_weight, "a list of positive numbers, one per rank, e.g. [2, 1, 1]"))
    dtype: str = opt("auto", Str(DTYPES))
    quant: str = opt("auto", Str(QUANT_MODES))
    device: str = opt("cpu", Str(("cpu", "cuda")))
    aggregation: Aggregation = field(default_factory=Aggregation)
    load_balancing: LoadBalancing = field(default_factory=LoadBalancing)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)


@dataclass(frozen=True)
class Replication:
    """One node (cluster.nnodes 1): `min_replicas` engine groups (flag --replicas), each of
    cluster.nproc_per_node ranks holding the whole model, under one front end. Several nodes: how many
    nodes keep a full copy of each model file (node 0, then nodes 1, 2...); the others hold only the
    slices their ranks read, received from node 0."""

    min_replicas: int = opt(1, Int(1))
    max_replicas: int = opt(0, Int(0, note="0: the same as min_replicas"))
    strategy: str = opt("none", Str())


@dataclass(frozen=True)
class ModelsSettings:
    storage_path: Path = field(default_factory=_default_models_dir, metadata={"kind": Directory()})
    # Other stores in Ollama's layout (another installation's ~/.ollama/models, say), read in place:
    # their models are listed and loaded without copying, and never written to. Flag: --extra-stores.
    extra_stores: tuple[Path, ...] = opt(
        (), List(_store_dir, "a list of existing Ollama store directories (each with a manifests/ folder)")
    )
    replication: Replication = field(default_factory=Replication)
    # /api/create from a path on the server, for clients other than loopback ones (who always may).
    allow_server_paths: bool = opt(False, Bool())


@dataclass(frozen=True)
class Caching:
    """The KV cache of each engine rank: `size` bytes in fixed-size blocks shared by every running
    sequence (a request reserves what it may need when it starts, or waits); `enabled` keeps the
    blocks of finished requests for reuse by requests that start with the same tokens (a shared
    system prompt, the earlier turns of a chat)."""

    enabled: bool = opt(True, Bool())
    size: int = opt(2 * 1024**3, Size(lo=1024**2))
    ttl: float = opt(3600.0, Duration(0, note="0: no expiry"))


@dataclass(frozen=True)
class Compression:
    """gzip for whole JSON and text replies of 1 KiB or more (never for NDJSON or SSE streams), for
    clients whose Accept-Encoding allows it (tp_ollama.server.compression)."""

    enabled: bool = opt(True, Bool())
    algorithm: str = opt("gzip", Str(("gzip",)))


@dataclass(frozen=True)
class PerformanceSettings:
    caching: Caching = field(default_factory=Caching)
    compression: Compression = field(default_factory=Compression)


@dataclass(frozen=True)
class Settings:
    api: ApiSettings = field(default_factory=ApiSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    performance: PerformanceSettings = field(default_factory=PerformanceSettings)

    def notes(self) -> list[str]:
        """One warning per accepted-but-not-implemented section set to anything but its defaults."""
        mine, default = dict(leaves(self)), dict(leaves(Settings()))
        notes = []
        for section, reason in NOT_IMPLEMENTED.items():
            changed = [
                f"{key} = {value_kinds()[key].show(value)}"
                for key, value in mine.items()
                if (key == section or key.startswith(section + ".")) and value != default[key]
            ]
            if changed:
                notes.append(f"{', '.join(changed)}: accepted but {reason}")
        return notes

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (durations in seconds, sizes in bytes, paths as text), for status routes."""
        return _plain(self)

    def describe(self) -> str:
        a, c, i = self.api, self.cluster, self.inference
        replicas = self.models.replication.min_replicas
        keep = "forever" if i.keep_alive < 0 else format_duration(i.keep_alive)
        weights = f", weights {','.join(f'{w:g}' for w in i.tp_weights)}" if i.tp_weights else ""
        return "\n".join(
            [
                f"api: {host_port(a.host, a.port)} (clients: {a.client_url()}), "
                f"bodies up to {format_size(a.max_body_bytes)}",
                f"cluster: {c.nnodes} node(s) x {c.nproc_per_node} rank(s) = TP {c.world_size}{weights}, "
                f"this node {c.node_rank}, rendezvous {host_port(c.rendezvous_addr, c.rendezvous_port)}, "
                f"comm {c.comm}",
                f"inference: {i.max_concurrent} at once per replica, queue {i.max_queue}, num_ctx {i.num_ctx}, "
                f"keep_alive {keep}, {i.dtype} (quant {i.quant}) on {i.device}",
                (
                    f"replicas: {replicas} engine group(s) of TP {c.world_size}"
                    + (f", {i.load_balancing.algorithm}" if replicas > 1 else "")
                    if c.nnodes == 1
                    else f"model copies: on {min(replicas, c.nnodes)} of {c.nnodes} nodes, slices on the others"
                ),
                f"models: {self.models.storage_path}",
            ]
        )


# ---- the tree as data -------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """Plain JSON types: sections as dicts, tuples as lists, paths as text."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return str(obj) if isinstance(obj, Path) else obj


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every value in a settings tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "kind" in f.metadata:
            yield prefix + f.name, value
        else:
            yield from leaves(value, f"{prefix}{f.name}.")


@functools.cache
def key_schema(cls: type = Settings, prefix: str = "") -> dict[str, Kind | type]:
    """Dotted key -> its Kind for a value, or the dataclass for a section."""
    out: dict[str, Kind | type] = {}
    for f in dataclasses.fields(cls):
        if "kind" in f.metadata:
            out[prefix + f.name] = f.metadata["kind"]
        else:
            sub = cast(type, f.default_factory)
            out[prefix + f.name] = sub
            out.update(key_schema(sub, f"{prefix}{f.name}."))
    return out


@functools.cache
def value_kinds() -> dict[str, Kind]:
    """Dotted key -> its Kind, for the values only (not the sections)."""
    return {k: v for k, v in key_schema().items() if isinstance(v, Kind)}
