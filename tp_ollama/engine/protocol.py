"""Every message that crosses a process boundary of the engine, typed and encoded in one place.

Two channels carry them:
- the front end's socket to engine rank 0: `Command`s one way, `Reply`s the other, each a
  length-prefixed msgpack frame (`frame`, `FrameBuffer`, `read_frame`);
- the broadcast from rank 0 to every rank of the group, once a step: a `Tick` (the control commands
  to run, then the batch's `Plan`), and the few facts ranks exchange for a command (`RankFailure`,
  `RankFacts`).

Every message is a msgspec Struct; a union is told apart by its tag. `GenerationOptions` crosses as
itself (decoding it runs its own validation). To add a field, give it a default: an older peer's
frames still decode.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

from tp_ollama.engine.options import GenerationOptions

FRAME_HEADER = struct.Struct(">I")  # payload length, big-endian
MAX_FRAME = 1 << 30  # a frame announcing more is a broken peer, not a message


class OutputFormat(msgspec.Struct, frozen=True):
    """Structured output for one request: `kind` "json" (any JSON object) or "schema" (a JSON Schema,
    in `schema`). The engine enforces it while decoding, as a mask over each rank's vocabulary slice."""

    kind: str
    schema: dict[str, Any] | None = None


# --- front end -> engine rank 0 ---------------------------------------------------------------------


class Generate(msgspec.Struct, tag="generate"):
    id: str
    prompt: list[int]
    options: GenerationOptions
    eos: frozenset[int]
    format: OutputFormat | None = None
    # A request taken up again on a new group (its old one died): the tokens its client already has.
    # They are run as the decode steps that made them, not sampled or sent again (engine/batch.py).
    resumed: list[int] = msgspec.field(default_factory=list)


class Cancel(msgspec.Struct, tag="cancel"):
    id: str


class FileRef(msgspec.Struct, frozen=True):
    """One file of a model: its name in an HF directory ("" for a GGUF file), digest and size."""

    name: str
    digest: str  # "sha256:<hex>"
    size: int


class Load(msgspec.Struct, tag="load"):
    id: str
    path: str  # a GGUF file or HF directory on node 0 (node 0's ranks read it there)
    dtype: str = "auto"
    num_ctx: int = 4096
    quant: str = "auto"
    # The model's files by digest: other nodes' ranks find them in their own stores, or read the byte
    # ranges they need from node 0 (tp_ollama.engine.model_files). Empty: `path` on every node.
    files: list[FileRef] = msgspec.field(default_factory=list)


class Unload(msgspec.Struct, tag="unload"):
    id: str


class Embed(msgspec.Struct, tag="embed"):
    id: str
    inputs: list[list[int]]


class DescribeCluster(msgspec.Struct, tag="cluster"):
    id: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    id: str = "shutdown"


Command = Generate | Cancel | Load | Unload | Embed | DescribeCluster | Shutdown
Control = Load | Unload | Embed | DescribeCluster | Shutdown  # what every rank runs, between steps


# --- engine rank 0 -> front end ---------------------------------------------------------------------


class FinalStats(msgspec.Struct):
    """How a request ended, with Ollama's counts and nanosecond durations."""

    done_reason: str = ""  # "stop", "length" or "cancel"
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    comm_duration: int = 0  # ns in collectives during this request (0 on one rank)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


# What each rank's entry of LoadInfo.layout says of where its weights came from (engine/state.py).
WEIGHT_FACTS = ("node", "weights_from", "received_bytes", "cached_bytes", "read_seconds", "fetch_seconds")


class LoadInfo(msgspec.Struct):
    """What a load made, for /api/ps and the cluster endpoints."""

    path: str
    dtype: str
    num_ctx: int
    quant: str
    world_size: int
    layout: list[dict[str, Any]]  # each rank's shares (TPLayout.describe()) and device
    size_bytes: int
    precision: dict[str, Any]  # what dtype and quant became: {"dtype": "bfloat16", "weights": {...}}
    load_seconds: float
    kv_blocks: int
    kv_block_size: int


class Token(msgspec.Struct, tag="token"):
    id: str
    token: int


class Done(msgspec.Struct, tag="done"):
    id: str
    stats: FinalStats


class Failed(msgspec.Struct, tag="failed"):
    id: str
    error: str


class Loaded(msgspec.Struct, tag="loaded"):
    id: str
    info: LoadInfo


class Embedded(msgspec.Struct, tag="embedded"):
    id: str
    embeddings: list[list[float]]


class ClusterFacts(msgspec.Struct, tag="cluster_facts"):
    id: str
    world_size: int
    ranks: list[dict[str, Any]]  # parallel.facts.rank_facts of each rank
    as_of: float  # unix seconds
    kv_cache: dict[str, Any] | None = None
    running: int = 0
    waiting: int = 0


class Ack(msgspec.Struct, tag="ack"):
    id: str


Reply = Token | Done | Failed | Loaded | Embedded | ClusterFacts | Ack


# --- rank 0 -> every rank ---------------------------------------------------------------------------


class Request(msgspec.Struct):
    """What a sequence needs to start; identical on every rank (it travels in the plan)."""

    id: str
    prompt: list[int]
    options: GenerationOptions
    eos: frozenset[int]
    constrained: bool = False  # rank 0 holds the grammar; the others take its masks
    resumed: list[int] = msgspec.field(default_factory=list)  # see Generate


class Plan(msgspec.Struct):
    """One step, decided by rank 0. `prefill`: (id, tokens) prompt chunks; `decode`: ids of the
    sequences that write their pending token and sample the next."""

    add: list[Request] = msgspec.field(default_factory=list)
    drop: list[str] = msgspec.field(default_factory=list)
    prefill: list[tuple[str, int]] = msgspec.field(default_factory=list)
    decode: list[str] = msgspec.field(default_factory=list)


class Tick(msgspec.Struct):
    """Everything every rank does in one step: run `control` in order, then apply `plan`. `ended`
    names the requests rank 0 will plan no more without a final event from the batch (refused at
    admission, or cancelled), so that a rank following one request knows it is over."""

    control: list[Control] = msgspec.field(default_factory=list)
    plan: Plan | None = None
    ended: list[str] = msgspec.field(default_factory=list)


class RankFailure(msgspec.Struct):
    """A control command's error on one rank, broadcast so that every rank reports the same one."""

    error: str


class RankFacts(msgspec.Struct):
    facts: dict[str, Any]


# --- encoding ---------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_commands = msgspec.msgpack.Decoder(Command)
_replies = msgspec.msgpack.Decoder(Reply)
_ticks = msgspec.msgpack.Decoder(Tick)
_failures = msgspec.msgpack.Decoder(RankFailure)
_facts = msgspec.msgpack.Decoder(RankFacts)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_command(data: bytes) -> Command:
    return _commands.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _replies.decode(data)


def decode_tick(data: bytes) -> Tick:
    return _ticks.decode(data)


def decode_failure(data: bytes) -> RankFailure:
    return _failures.decode(data)


def decode_facts(data: bytes) -> RankFacts:
    return _facts.decode(data)


def frame(msg: msgspec.Struct) -> bytes:
    """`msg` as one frame of the socket: its length, then its bytes."""
    payload = encode(msg)
    return FRAME_HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Bytes read from a socket in, whole frames' payloads out; a frame announcing more than
    `max_bytes` is a broken (or hostile) peer, not a message."""

    def __init__(self, max_bytes: int = MAX_FRAME) -> None:
        self.data = b""
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> None:
        self.data += data

    def pop_all(self) -> list[bytes]:
        out = []
        while len(self.data) >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(self.data)
            _check_length(n, self.max_bytes)
            end = FRAME_HEADER.size + n
            if len(self.data) < end:
                break
            out.append(self.data[FRAME_HEADER.size : end])
            self.data = self.data[end:]
        return out


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME) -> bytes | None:
    """The next frame's payload, or None at the end of the stream."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    (n,) = FRAME_HEADER.unpack(header)
    _check_length(n, max_bytes)
    return await reader.readexactly(n)


def _check_length(n: int, max_bytes: int) -> None:
    if n > max_bytes:
        raise ValueError(f"a frame announced {n} bytes, more than the {max_bytes} allowed")
