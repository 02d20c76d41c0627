"""The membership channel between node 0 (the coordinator, in the front end) and every other node's
agent: typed messages, their framing, and the shared-secret handshake.

Every frame is a 4-byte length and a msgpack message (a msgspec Struct told apart by its tag); no
message carries code or pickled objects. A connection opens with a challenge each way: node 0 sends a
random nonce, the agent answers with its Hello and an HMAC-SHA256 of that nonce (and of its own
nonce and facts) under the cluster secret, and node 0 proves the same back in its Welcome. A peer
that fails either proof is dropped; nothing it sent is acted on.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import os
import secrets
import socket
from pathlib import Path

import msgspec

from tp_ollama.engine.protocol import FRAME_HEADER, FrameBuffer, read_frame
from tp_ollama.errors import ConfigError

MAX_FRAME = 1 << 16  # membership messages are a few hundred bytes; more is not a peer of ours
SECRET_ENV = "TP_OLLAMA_CLUSTER_SECRET"
WRONG_SECRET = "the cluster secret does not match"


class Challenge(msgspec.Struct, tag="challenge"):
    nonce: str  # hex


class Hello(msgspec.Struct, tag="hello"):
    node_rank: int  # the --node-rank this node was started with
    nproc: int
    host: str
    pid: int
    nonce: str  # the agent's own challenge to node 0
    mac: str  # proof of the secret over node 0's nonce and these facts


class Welcome(msgspec.Struct, tag="welcome"):
    heartbeat_s: float
    detect_timeout_s: float
    mac: str  # node 0's proof over the agent's nonce


class Refused(msgspec.Struct, tag="refused"):
    why: str


class Form(msgspec.Struct, tag="form"):
    """Start this node's ranks as node `node_rank` of `nnodes` in generation `generation`, joining the
    group's store at master_addr:master_port."""

    generation: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    ranks: tuple[int, ...] = ()  # the group's ranks this node runs (global indices)
    world_size: int = 0
    comm: str = "auto"
    device: str = "cpu"
    tp_weights: str | None = None  # every rank of the new group, in rank order
    join_timeout_s: float = 120.0
    max_running: int = 16
    kv_cache_bytes: int | None = None
    prefix_cache: bool = True
    min_replicas: int = 1  # nodes 0..min_replicas-1 keep full copies of the model files they read
    pp: int = 1  # pipeline stages of the group (its ranks are tp x pp)
    pp_weights: str | None = None
    strategy: str = "tensor"  # inference.partitioning.strategy
    memory_budget: int = 0  # inference.partitioning.memory_budget


class Stop(msgspec.Struct, tag="stop"):
    generation: int


class Stopped(msgspec.Struct, tag="stopped"):
    generation: int


class Exited(msgspec.Struct, tag="exited"):
    """This node's ranks of `generation` ended by themselves (a rank crashed, or a peer did)."""

    generation: int
    code: int


class Hung(msgspec.Struct, tag="hung"):
    """A rank of `generation` on this node is stopped (SIGSTOP, a debugger): it holds up the group."""

    generation: int
    why: str


class Beat(msgspec.Struct, tag="beat"):
    pass


class Bye(msgspec.Struct, tag="bye"):
    """The cluster is shutting down: the agent stops its ranks and exits."""


# --- model files: a rank of a node without the model reads the byte ranges it needs from node 0 ---------


class Reader(msgspec.Struct, tag="reader"):
    """A rank's opening instead of Hello: it reads model files node 0 offers (tp_ollama.membership.files)."""

    node_rank: int
    nonce: str
    mac: str  # proof of the secret over node 0's nonce, node_rank and nonce


class Want(msgspec.Struct, tag="want"):
    """Bytes [a, b) of each range of file `file` (an id node 0 offered: a blob digest), in this order."""

    file: str
    ranges: list[tuple[int, int]]


class Data(msgspec.Struct, tag="data"):
    """The answer to a Want: `size` bytes follow this frame, the ranges' bytes back to back (zlib
    compressed when `compressed`, `raw_size` once decompressed); `sha256` is of the raw bytes."""

    size: int
    raw_size: int
    compressed: bool
    sha256: str


Message = (
    Challenge | Hello | Welcome | Refused | Form | Stop | Stopped | Exited | Hung | Beat | Bye | Reader | Want | Data
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def frame(msg: Message) -> bytes:
    """`msg` as one frame: its length, then its bytes (the engine socket's framing)."""
    payload = _encoder.encode(msg)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> Message:
    return _decoder.decode(payload)


class Frames:
    """Bytes in, whole messages out (for a socket read in pieces)."""

    def __init__(self) -> None:
        self._buffer = FrameBuffer(MAX_FRAME)
        self.ready: collections.deque[Message] = collections.deque()

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)
        self.ready.extend(decode(payload) for payload in self._buffer.pop_all())


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message of an asyncio stream, or None at its end."""
    payload = await read_frame(reader, MAX_FRAME)
    return None if payload is None else decode(payload)


def recv_one(sock: socket.socket, frames: Frames, timeout_s: float) -> Message:
    """The next message on a blocking socket within `timeout_s` (else TimeoutError); ConnectionError
    when the peer closes."""
    sock.settimeout(timeout_s)
    while not frames.ready:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("the peer closed the connection")
        frames.feed(data)
    return frames.ready.popleft()


# --- the secret ---------------------------------------------------------------------------------------


def new_nonce() -> str:
    return secrets.token_hex(16)


def mac(secret: str, *parts: object) -> str:
    text = "|".join(str(p) for p in parts).encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()


def hello_mac(secret: str, challenge: str, node_rank: int, nproc: int, host: str, pid: int, nonce: str) -> str:
    return mac(secret, "hello", challenge, node_rank, nproc, host, pid, nonce)


def reader_mac(secret: str, challenge: str, node_rank: int, nonce: str) -> str:
    return mac(secret, "reader", challenge, node_rank, nonce)


def welcome_mac(secret: str, nonce: str) -> str:
    return mac(secret, "welcome", nonce)


def proves(secret: str, expected: str, given: str) -> bool:
    return hmac.compare_digest(expected, given) if secret else True


def secret_file() -> Path:
    """Where node 0 keeps a secret it generated, and where nodes started without one look for it:
    `$TP_OLLAMA_CACHE/cluster-secret` (default ~/.cache/tp-ollama), readable by its owner only."""
    from tp_ollama.config.settings import default_cache_dir

    return default_cache_dir() / "cluster-secret"


def configured_secret(configured: str) -> str:
    """The secret from the settings (cluster.secret), the environment, or the secret file, in that order."""
    if configured:
        return configured
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    path = secret_file()
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def ensure_secret(configured: str) -> tuple[str, bool]:
    """Node 0's secret, generating (and saving) one when none is configured; True when generated."""
    found = configured_secret(configured)
    if found:
        return found, False
    value = secrets.token_urlsafe(24)
    path = secret_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
    except OSError as e:
        raise ConfigError(f"cannot save the generated cluster secret to {path}: {e}") from None
    return value, True
