"""Server settings, resolved once: defaults < YAML file < environment < flags, into a frozen `Settings`.

Every problem is one `ConfigError` naming the dotted key, the value, where the value came from and what
was expected. An unknown key is an error (with the closest known key when it looks like a typo). The
file keeps the sections of the original "distributed Ollama" design (`p2p` is read as `cluster`); keys
of that design that tp-ollama does not implement are accepted, listed in NOT_IMPLEMENTED with the
reason, and reported by `Settings.notes()` when set to anything but their default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, cast

import yaml

from tp_ollama.errors import ConfigError
from tp_ollama.launch import DEFAULT_MASTER_PORT, parse_bootstrap

MIB = 1024 * 1024
DEFAULT_PORT = 11434
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
    "inference.fault_tolerance": "not implemented: a failed rank fails its requests; the group is not restarted",
    "models.replication.max_replicas": "not implemented: min_replicas groups are started and none are added under load",
    "models.replication.strategy": "not implemented: every replica runs on this node (node 0)",
    "performance.caching.ttl": "not implemented: cached prefix blocks stay until evicted (least recently used first)",
}

# Environment variables (Ollama's names) and the keys they set. OLLAMA_HOST sets host and port.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "OLLAMA_HOST": ("api.host", "api.port"),
    "OLLAMA_ORIGINS": ("api.origins",),
    "OLLAMA_MODELS": ("models.storage_path",),
    "OLLAMA_KEEP_ALIVE": ("inference.keep_alive",),
    "OLLAMA_NUM_PARALLEL": ("inference.max_concurrent",),
    "OLLAMA_MAX_QUEUE": ("inference.max_queue",),
    "OLLAMA_CONTEXT_LENGTH": ("inference.num_ctx",),
}
# Upstream reads 0 in these as "automatic": here that is the configured value.
_ENV_ZERO_IS_UNSET = ("OLLAMA_NUM_PARALLEL", "OLLAMA_CONTEXT_LENGTH")

# Flag names (as the CLI spells its options, `-` or `_`) and the keys they set. Any dotted key
# ("api.port") is a flag too. `bootstrap` (HOST:PORT or /ip4/A.B.C.D/tcp/PORT) sets the rendezvous
# address and port.
FLAGS: dict[str, str] = {
    "host": "api.host",
    "port": "api.port",
    "origins": "api.origins",
    "nnodes": "cluster.nnodes",
    "node_rank": "cluster.node_rank",
    "nproc_per_node": "cluster.nproc_per_node",
    "tp": "cluster.nproc_per_node",
    "master_addr": "cluster.rendezvous_addr",
    "master_port": "cluster.rendezvous_port",
    "join_timeout": "cluster.join_timeout",
    "comm": "cluster.comm",
    "num_parallel": "inference.max_concurrent",
    "max_queue": "inference.max_queue",
    "load_balancing": "inference.load_balancing.algorithm",
    "replicas": "models.replication.min_replicas",
    "keep_alive": "inference.keep_alive",
    "num_ctx": "inference.num_ctx",
    "tp_weights": "inference.tp_weights",
    "dtype": "inference.dtype",
    "quant": "inference.quant",
    "device": "inference.device",
    "models": "models.storage_path",
}

_SECTION_ALIASES = {"p2p": "cluster"}  # the original design's name for the cluster section
_KEY_ALIASES = {"p2p.port": "rendezvous_port"}


class _Invalid(ConfigError):
    """A value that does not parse. The loader adds the key and where the value came from."""

    def __init__(self, value: Any, expected: str, reason: str | None = None) -> None:
        self.reason = reason or f"is invalid: expected {expected}"
        super().__init__(f"{value!r} {self.reason}")


# ---- value parsers ------------------------------------------------------------------------------

_DURATION_EXPECTED = 'a duration such as "30s", "5m", "1h30m", "500ms" or a number of seconds'
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: Any) -> float:
    """Go's time.ParseDuration ("1h30m", "-5m", "500ms") or a number of seconds (int, float or text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(value, _DURATION_EXPECTED)
    if isinstance(value, str):
        text = value.strip()
        sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.removeprefix("+"))
        if re.fullmatch(_NUMBER, body):
            seconds = float(body)
        elif re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", body):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(body))
        else:
            raise _Invalid(value, _DURATION_EXPECTED)
        value = sign * seconds
    if not math.isfinite(value):
        raise _Invalid(value, _DURATION_EXPECTED)
    return float(value)


def format_duration(seconds: float) -> str:
    """The Go-style spelling parse_duration reads back: 300 -> "5m", 5400 -> "1h30m", 0.5 -> "500ms"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0 or seconds >= 1:
        h, rest = divmod(seconds, 3600)
        m, s = divmod(rest, 60)
        text = (f"{h:.0f}h" if h else "") + (f"{m:.0f}m" if m else "") + (f"{s:g}s" if s else "")
        return text or "0s"
    return f"{seconds * 1000:g}ms"


_SIZE_EXPECTED = 'a size such as "1GB", "512MiB", "1.5G" or a number of bytes'
_SIZE = re.compile(rf"({_NUMBER})\s*(?:([kmgtp])(i?))?b?", re.IGNORECASE)
_SIZE_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: Any) -> int:
    """Bytes from "1GB" / "1.5G" (powers of 1000), "512MiB" / "512Mi" (powers of 1024) or an int."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(value, _SIZE_EXPECTED)
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m is None:
            raise _Invalid(value, _SIZE_EXPECTED)
        number, prefix, binary = m.groups()
        power = _SIZE_POWERS[prefix.lower()] if prefix else 0
        size = Decimal(number) * (1024 if binary else 1000) ** power
    else:
        try:
            size = Decimal(value)
        except InvalidOperation:
            raise _Invalid(value, _SIZE_EXPECTED) from None
    if not size.is_finite() or size < 0 or size != size.to_integral_value():
        raise _Invalid(value, _SIZE_EXPECTED + " (a whole, non-negative number of bytes)")
    return int(size)


def format_size(n: int) -> str:
    """The shortest exact spelling: 67108864 -> "64MiB", 10**9 -> "1GB", 1000 -> "1KB"."""
    for power in range(4, 0, -1):
        for unit, base in (("iB", 1024), ("B", 1000)):
            if n and n % base**power == 0:
                return f"{n // base**power}{'KMGT'[power - 1]}{unit}"
    return f"{n}B"


class OllamaHost(NamedTuple):
    scheme: str
    host: str  # without brackets; "" never (the default host is filled in)
    port: int
    path: str = ""  # "/ollama" for a proxy path, else ""

    def client_url(self) -> str:
        return client_url(self.host, self.port, self.scheme, self.path)


def _strip_env(value: str) -> str:
    """Ollama trims spaces and quotes around every variable's value: ` " 1.2.3.4 " ` -> 1.2.3.4."""
    return value.strip().strip("\"'").strip()


def parse_ollama_host(value: str) -> OllamaHost:
    """OLLAMA_HOST as Ollama reads it: `host`, `host:port`, `:port`, `scheme://host:port/path`, `[::1]:1337`.

    Without a port: http -> 80, https -> 443, no scheme -> 11434. NOTE: `:port` binds 127.0.0.1 here,
    where Ollama binds every interface; listening beyond loopback must be asked for (0.0.0.0), for safety.
    A bad port is an error here (Ollama logs a warning and uses the default port).
    """
    text = _strip_env(value)
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
    if scheme not in ("http", "https"):
        raise ConfigError(f"OLLAMA_HOST {value!r} is invalid: expected the scheme http or https, got {scheme!r}")
    hostport, _, path = hostport.partition("/")
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            raise ConfigError(f"OLLAMA_HOST {value!r} is invalid: expected [IPv6] or [IPv6]:PORT")
        port_text = rest[1:]
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:  # a name, an IPv4 address or a bare IPv6 address such as ::1
        host, port_text = hostport, ""
    port = {"http": 80, "https": 443}[scheme] if sep else DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"OLLAMA_HOST {value!r} has an invalid port {port_text!r}: expected 0..65535")
        port = int(port_text)
    return OllamaHost(scheme, host or "127.0.0.1", port, f"/{path}" if path else "")


def client_url(host: str, port: int, scheme: str = "http", path: str = "") -> str:
    """Where a client connects to a server bound to host:port: a wildcard address becomes loopback."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{host_port(host, port)}{path}"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- kinds of values: each turns a YAML value (or, from env and flags, text) into the stored type ----


@dataclass(frozen=True)
class _Given:
    value: Any
    origin: str  # "in cfg.yaml", "p2p.port in cfg.yaml", "from OLLAMA_HOST", "from --node-rank"
    text: bool = False  # from the environment or a command line: numbers and lists may be spelled as text
    base: Path | None = None  # relative paths in a file are relative to the file's directory


class _Kind(ABC):
    expected = ""

    @abstractmethod
    def parse(self, g: _Given) -> Any: ...

    def show(self, value: Any) -> str:
        return repr(value)


class _Int(_Kind):
    def __init__(self, lo: int, hi: int | None = None, note: str = "") -> None:
        self.lo, self.hi = lo, hi
        self.expected = f"an integer {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        self.expected += f" ({note})" if note else ""

    def parse(self, g: _Given) -> int:
        v = g.value
        if g.text and isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < self.lo or (self.hi is not None and v > self.hi):
            raise _Invalid(g.value, self.expected)
        return v


class _Bool(_Kind):
    expected = "true or false"
    _TEXT: ClassVar[dict[str, bool]] = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(
        ("0", "false", "no", "off"), False
    )

    def show(self, value: Any) -> str:
        return "true" if value else "false"

    def parse(self, g: _Given) -> bool:
        if isinstance(g.value, bool):
            return g.value
        if g.text and isinstance(g.value, str) and g.value.strip().lower() in self._TEXT:
            return self._TEXT[g.value.strip().lower()]
        raise _Invalid(g.value, self.expected)


class _Str(_Kind):
    def __init__(self, choices: tuple[str, ...] = (), planned: Mapping[str, str] | None = None) -> None:
        self.choices, self.planned = choices, dict(planned or {})
        self.expected = "one of " + ", ".join(f'"{c}"' for c in choices) if choices else "a non-empty string"

    def parse(self, g: _Given) -> str:
        v = g.value.strip() if isinstance(g.value, str) else g.value
        if v in self.planned:
            raise _Invalid(g.value, self.expected, f"is not implemented yet: {self.planned[v]}")
        if not isinstance(v, str) or not v or (self.choices and v not in self.choices):
            raise _Invalid(g.value, self.expected)
        return v


class _Host(_Kind):
    expected = "a host name or IP address (IPv6 with or without brackets)"

    def parse(self, g: _Given) -> str:
        v = g.value.strip() if isinstance(g.value, str) else g.value
        if not isinstance(v, str) or not v or re.search(r"[\s/]", v):
            raise _Invalid(g.value, self.expected)
        return v[1:-1] if v.startswith("[") and v.endswith("]") else v


class _Duration(_Kind):
    def __init__(self, lo: float | None = None, strict: bool = False, note: str = "") -> None:
        self.lo, self.strict = lo, strict
        bound = "" if lo is None else f" {'>' if strict else '>='} {lo:g}s"
        self.expected = _DURATION_EXPECTED + bound + (f" ({note})" if note else "")

    def parse(self, g: _Given) -> float:
        try:
            seconds = parse_duration(g.value)
        except _Invalid:
            raise _Invalid(g.value, self.expected) from None
        if self.lo is not None and (seconds <= self.lo if self.strict else seconds < self.lo):
            raise _Invalid(g.value, self.expected)
        return seconds

    def show(self, value: Any) -> str:
        return format_duration(value)


class _Size(_Kind):
    def __init__(self, lo: int = 0) -> None:
        self.lo = lo
        self.expected = _SIZE_EXPECTED + (f" of at least {lo} bytes" if lo else "")

    def parse(self, g: _Given) -> int:
        try:
            n = parse_size(g.value)
        except _Invalid:
            raise _Invalid(g.value, self.expected) from None
        if n < self.lo:
            raise _Invalid(g.value, self.expected)
        return n

    def show(self, value: Any) -> str:
        return format_size(value)


class _List(_Kind):
    """A YAML list, or comma-separated text from the environment or a flag ("2,1,1")."""

    def __init__(self, item: Callable[[Any], Any], expected: str) -> None:
        self.item, self.expected = item, expected

    def parse(self, g: _Given) -> tuple[Any, ...]:
        v = g.value
        if g.text and isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if not isinstance(v, list | tuple):
            raise _Invalid(g.value, self.expected)
        try:
            return tuple(self.item(x) for x in v)
        except (TypeError, ValueError):
            raise _Invalid(g.value, self.expected) from None


def _origin(x: Any) -> str:
    if not isinstance(x, str) or not x.strip():
        raise ValueError(x)
    return x.strip()


def _weight(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | str) or not 0 < float(x) < math.inf:
        raise ValueError(x)
    return float(x)


class _Path(_Kind):
    expected = "a directory path"

    def parse(self, g: _Given) -> Path:
        if not isinstance(g.value, str | Path) or not str(g.value).strip():
            raise _Invalid(g.value, self.expected)
        path = Path(str(g.value).strip()).expanduser()
        return path if path.is_absolute() else (g.base or Path.cwd()) / path


def _opt(default: Any, kind: _Kind) -> Any:
    return field(default=default, metadata={"kind": kind})


def default_cache_dir() -> Path:
    """Where converted tokenizers and packed weights are kept: `$TP_OLLAMA_CACHE`, else
    `~/.cache/tp-ollama`."""
    configured = os.environ.get("TP_OLLAMA_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "tp-ollama"


def _default_models_dir() -> Path:
    return Path("~/.ollama/models").expanduser()


# ---- the settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiSettings:
    host: str = _opt("127.0.0.1", _Host())
    port: int = _opt(DEFAULT_PORT, _Int(0, 65535, "0: any free port"))
    origins: tuple[str, ...] = _opt((), _List(_origin, "a list of origins such as chrome-extension://*"))
    max_body_bytes: int = _opt(64 * MIB, _Size(lo=1024))
    request_timeout: float = _opt(60.0, _Duration(0, note="0: no limit"))

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return DEFAULT_ORIGINS + self.origins

    def client_url(self) -> str:
        return client_url(self.host, self.port)


@dataclass(frozen=True)
class Discovery:
    enabled: bool = _opt(False, _Bool())
    interval: float = _opt(30.0, _Duration(0, strict=True))


@dataclass(frozen=True)
class ClusterSettings:
    rendezvous_addr: str = _opt("127.0.0.1", _Host())
    rendezvous_port: int = _opt(DEFAULT_MASTER_PORT, _Int(0, 65535, "0: any free port, one node only"))
    nnodes: int = _opt(1, _Int(1))
    node_rank: int = _opt(0, _Int(0))
    nproc_per_node: int = _opt(1, _Int(1))
    join_timeout: float = _opt(120.0, _Duration(0, strict=True))
    comm: str = _opt("auto", _Str(COMM_KINDS))
    discovery: Discovery = field(default_factory=Discovery)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def launch_cluster(self) -> Any:
        """The launcher's view of this section (a tp_ollama.launch.Cluster)."""
        from tp_ollama.launch import Cluster

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
    strategy: str = _opt("tensor", _Str(("tensor",), {"layerwise": 'layer-wise (pipeline) partitioning; use "tensor"'}))
    max_partitions: int = _opt(0, _Int(0, note="the largest world size allowed; 0: no limit"))


@dataclass(frozen=True)
class Aggregation:
    strategy: str = _opt("concat", _Str())


@dataclass(frozen=True)
class LoadBalancing:
    """How requests are spread over the replicas (models.replication.min_replicas engine groups):
    least_loaded sends each to the replica with the fewest requests running (ties: the lowest index),
    round_robin to the next one in turn that has a free slot. `enabled` false needs one replica."""

    enabled: bool = _opt(True, _Bool())
    algorithm: str = _opt("least_loaded", _Str(("least_loaded", "round_robin")))


@dataclass(frozen=True)
class FaultTolerance:
    enabled: bool = _opt(False, _Bool())
    retry_attempts: int = _opt(0, _Int(0))


@dataclass(frozen=True)
class InferenceSettings:
    # Requests generating at once per engine group (replica); the engine batches them into one
    # decode step. 4 by default: a decode step reads every weight once whatever the batch, so a few
    # sequences cost little more than one, and 4 full-length sequences (num_ctx 4096) of an 8B Llama
    # in bfloat16 take 2 GiB of KV cache, the default performance.caching.size. Upstream Ollama
    # defaults to 1 per model (4 in older versions); vLLM to 256, sized for large GPUs.
    max_concurrent: int = _opt(4, _Int(1))
    max_queue: int = _opt(512, _Int(1))
    timeout: float = _opt(300.0, _Duration(0, note="0: no limit"))
    keep_alive: float = _opt(300.0, _Duration(note="negative: forever, 0: unload after each request"))
    num_ctx: int = _opt(4096, _Int(1))
    max_num_ctx: int = _opt(131072, _Int(1))
    max_num_predict: int = _opt(-1, _Int(-1, note="-1: no bound but num_ctx"))
    partitioning: Partitioning = field(default_factory=Partitioning)
    tp_weights: tuple[float, ...] = _opt((), _List(_weight, "a list of positive numbers, one per rank, e.g. [2, 1, 1]"))
    dtype: str = _opt("float32", _Str(DTYPES))
    quant: str = _opt("none", _Str(QUANT_MODES))
    device: str = _opt("cpu", _Str(("cpu", "cuda")))
    aggregation: Aggregation = field(default_factory=Aggregation)
    load_balancing: LoadBalancing = field(default_factory=LoadBalancing)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)


@dataclass(frozen=True)
class Replication:
    """`min_replicas` engine groups (flag --replicas), each of cluster.nproc_per_node ranks holding
    the whole model, on this node, under one front end."""

    min_replicas: int = _opt(1, _Int(1))
    max_replicas: int = _opt(0, _Int(0, note="0: the same as min_replicas"))
    strategy: str = _opt("none", _Str())


@dataclass(frozen=True)
class ModelsSettings:
    storage_path: Path = field(default_factory=_default_models_dir, metadata={"kind": _Path()})
    replication: Replication = field(default_factory=Replication)


@dataclass(frozen=True)
class Caching:
    """The KV cache of each engine rank: `size` bytes in fixed-size blocks shared by every running
    sequence (a request reserves what it may need when it starts, or waits); `enabled` keeps the
    blocks of finished requests for reuse by requests that start with the same tokens (a shared
    system prompt, the earlier turns of a chat)."""

    enabled: bool = _opt(True, _Bool())
    size: int = _opt(2 * 1024**3, _Size(lo=1024**2))
    ttl: float = _opt(3600.0, _Duration(0, note="0: no expiry"))


@dataclass(frozen=True)
class Compression:
    """gzip for whole JSON and text replies of 1 KiB or more (never for NDJSON or SSE streams), for
    clients whose Accept-Encoding allows it (tp_ollama.server.compression)."""

    enabled: bool = _opt(True, _Bool())
    algorithm: str = _opt("gzip", _Str(("gzip",)))


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
        mine, default = dict(_leaves(self)), dict(_leaves(Settings()))
        notes = []
        for section, reason in NOT_IMPLEMENTED.items():
            changed = [
                f"{key} = {_kinds()[key].show(value)}"
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
                f"replicas: {replicas} engine group(s) of TP {c.world_size}"
                + (f", {i.load_balancing.algorithm}" if replicas > 1 else ""),
                f"models: {self.models.storage_path}",
            ]
        )


# ---- loading ---------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return str(obj) if isinstance(obj, Path) else obj


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "kind" in f.metadata:
            yield prefix + f.name, value
        else:
            yield from _leaves(value, f"{prefix}{f.name}.")


@functools.cache
def _schema(cls: type = Settings, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> its _Kind for a value, or the dataclass for a section."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "kind" in f.metadata:
            out[prefix + f.name] = f.metadata["kind"]
        else:
            sub = cast(type, f.default_factory)
            out[prefix + f.name] = sub
            out.update(_schema(sub, f"{prefix}{f.name}."))
    return out


@functools.cache
def _kinds() -> dict[str, _Kind]:
    return {k: v for k, v in _schema().items() if isinstance(v, _Kind)}


def _suggest(section: str, written: str, key: str) -> str:
    """`did you mean X?` for a typo within the section, or the same name in another section."""
    schema = _schema()
    siblings = [k.rsplit(".", 1)[-1] for k in schema if k.rpartition(".")[0] == section]
    siblings += [k.rpartition(".")[2] for k in _KEY_ALIASES if k.rpartition(".")[0] == written]
    if section == "":
        siblings += list(_SECTION_ALIASES)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {written + '.' if written else ''}{close[0]}?"
    elsewhere = [k for k in schema if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere)}?"
    return f"; expected one of: {', '.join(sorted(siblings))}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_file(path: Path) -> dict[str, _Given]:
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    given: dict[str, _Given] = {}
    _walk(tree, "", "", path, given)
    return given


def _walk(tree: Any, section: str, written: str, path: Path, given: dict[str, _Given]) -> None:
    schema = _schema()
    if tree is None:
        return
    if not isinstance(tree, dict):
        what = f"section {written}" if written else "the top level"
        raise ConfigError(f"config file {path}: {what} must be a mapping of keys, got {tree!r}")
    if section == "" and "p2p" in tree and "cluster" in tree:
        raise ConfigError(f"config file {path}: p2p is another name for cluster; give one of them")
    for key, value in tree.items():
        where = f"{written}.{key}" if written else str(key)
        name = _KEY_ALIASES.get(where, _SECTION_ALIASES.get(key, key) if section == "" else key)
        dotted = f"{section}.{name}" if section else str(name)
        if not isinstance(key, str) or dotted not in schema:
            raise ConfigError(f"config file {path}: unknown key {where}{_suggest(section, written, str(key))}")
        if isinstance(schema[dotted], _Kind):
            origin = f"in {path}" if where == dotted else f"{where} in {path}"
            given[dotted] = _Given(value, origin, base=path.parent)
        else:
            _walk(value, dotted, where, path, given)


def _read_env(env: Mapping[str, str]) -> dict[str, _Given]:
    given: dict[str, _Given] = {}
    for var, keys in ENV_VARS.items():
        value = _strip_env(env.get(var, ""))
        if not value or (var in _ENV_ZERO_IS_UNSET and value == "0"):
            continue
        if var == "OLLAMA_HOST":
            parsed = parse_ollama_host(value)
            given["api.host"] = _Given(parsed.host, f"from {var}", text=True)
            given["api.port"] = _Given(parsed.port, f"from {var}", text=True)
        else:
            given[keys[0]] = _Given(value, f"from {var}", text=True)
    return given


def _read_flags(flags: Mapping[str, Any]) -> dict[str, _Given]:
    schema = _schema()
    given: dict[str, _Given] = {}
    for name, value in flags.items():
        if value is None:
            continue
        norm = name.lstrip("-").replace("-", "_")
        flag = f"--{norm.replace('_', '-')}" if "." not in norm else f"flag {norm}"
        if norm == "bootstrap":
            named = {f.lstrip("-").replace("-", "_") for f, v in flags.items() if v is not None}
            if {"master_addr", "master_port"} & named:
                raise ConfigError("--bootstrap sets the rendezvous address and port: give it or --master-addr/port")
            addr, port = parse_bootstrap(str(value))
            given["cluster.rendezvous_addr"] = _Given(addr, f"from {flag}", text=True)
            given["cluster.rendezvous_port"] = _Given(port, f"from {flag}", text=True)
            continue
        key = FLAGS.get(norm, norm)
        if not isinstance(schema.get(key), _Kind):
            close = difflib.get_close_matches(norm, [*FLAGS, *_kinds(), "bootstrap"], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; expected a name in FLAGS or a dotted key"
            raise ConfigError(f"unknown setting {name!r}{hint}")
        given[key] = _Given(value, f"from {flag}", text=True)
    return given


def _build(cls: type, prefix: str, given: Mapping[str, _Given]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if "kind" not in f.metadata:
            kwargs[f.name] = _build(cast(type, f.default_factory), key + ".", given)
        elif key in given:
            g = given[key]
            try:
                kwargs[f.name] = f.metadata["kind"].parse(g)
            except _Invalid as e:
                raise ConfigError(f"{key} = {g.value!r} ({g.origin}) {e.reason}") from None
    return cls(**kwargs)


def _check(s: Settings, given: Mapping[str, _Given]) -> None:
    """Rules between keys, checked once everything is parsed."""

    def bad(key: str, rule: str) -> ConfigError:
        value = dict(_leaves(s))[key]
        origin = given[key].origin if key in given else "default"
        return ConfigError(f"{key} = {_kinds()[key].show(value)} ({origin}) is invalid: {rule}")

    c, i, r = s.cluster, s.inference, s.models.replication
    if c.node_rank >= c.nnodes:
        raise bad("cluster.node_rank", f"expected 0..{c.nnodes - 1} for cluster.nnodes = {c.nnodes}")
    if c.nnodes > 1 and c.rendezvous_port == 0:
        raise bad("cluster.rendezvous_port", f"{c.nnodes} nodes need a fixed port, the same on every node")
    if i.tp_weights and len(i.tp_weights) != c.world_size:
        raise bad(
            "inference.tp_weights",
            f"expected one weight per rank: {c.world_size} (cluster.nnodes {c.nnodes} x nproc_per_node "
            f"{c.nproc_per_node}), got {len(i.tp_weights)}",
        )
    if 0 < i.partitioning.max_partitions < c.world_size:
        raise bad("inference.partitioning.max_partitions", f"the cluster has {c.world_size} ranks, more than this")
    if i.num_ctx > i.max_num_ctx:
        raise bad("inference.num_ctx", f"expected at most inference.max_num_ctx = {i.max_num_ctx}")
    if i.max_num_predict == 0:
        raise bad("inference.max_num_predict", "expected -1 (no bound) or a positive number of tokens")
    if 0 < r.max_replicas < r.min_replicas:
        raise bad("models.replication.min_replicas", f"expected at most max_replicas = {r.max_replicas}")
    if r.min_replicas > 1 and c.nnodes > 1:
        raise bad(
            "models.replication.min_replicas",
            f"replicas run on one node (each an engine group of its own), but cluster.nnodes = {c.nnodes}; "
            "expected 1 replica, or cluster.nnodes = 1",
        )
    if r.min_replicas > 1 and not i.load_balancing.enabled:
        raise bad(
            "inference.load_balancing.enabled",
            f"{r.min_replicas} replicas (models.replication.min_replicas) need requests spread over them: "
            "expected true, or 1 replica",
        )


def load_settings(config_path: Path | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> Settings:
    """Defaults < YAML file < environment (ENV_VARS) < flags (FLAGS names or dotted keys), checked once.

    A flag whose value is None is not given (a CLI option left unset).
    """
    given = _read_file(config_path) if config_path is not None else {}
    given.update(_read_env(env))
    given.update(_read_flags(flags))
    settings: Settings = _build(Settings, "", given)
    _check(settings, given)
    return settings
