"""Model files from node 0 to the ranks of nodes that do not have them, a byte range at a time.

Node 0 offers the files of each model it loads (`FileServer.offer`, by blob digest). A rank whose node
lacks a file connects to node 0's rendezvous port, proves the cluster secret (`Reader`, answered by
`Welcome`), and asks for the byte ranges its shard reads (`Want`); node 0 answers each with a `Data`
frame and the bytes, checksummed and compressed only when that pays for itself. The rank keeps what it
received (tp_ollama.store.partial), so a restarted node asks for nothing it already has.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tp_ollama.engine.protocol import FRAME_HEADER
from tp_ollama.errors import TpOllamaError
from tp_ollama.membership import wire
from tp_ollama.parallel.fastcomm_tcp import recv_exact
from tp_ollama.store.partial import Fetch

log = logging.getLogger(__name__)

MAX_WANT_BYTES = 32 << 20  # one answer's bytes; a rank splits what it needs into wants of this size
MAX_WANT_RANGES = 2048  # ranges in one Want (its frame stays under wire.MAX_FRAME)
SAMPLE_BYTES = 256 << 10  # what compression is tried on before a whole answer is compressed
IDLE_S = 300.0  # a reader connection with no Want for this long is closed
SEND_TIMEOUT_S = 60.0


class FileError(TpOllamaError):
    pass


# --- node 0 ---------------------------------------------------------------------------------------------


@dataclass
class Served:
    """What node 0 sent of one file to one node."""

    bytes: int = 0
    wants: int = 0
    compressed: int = 0  # answers sent compressed


class FileServer:
    """Node 0's side: the files it offers, by id, and what it sent of each to each node."""

    def __init__(self) -> None:
        self.offered: dict[str, Path] = {}
        self.sent: defaultdict[tuple[int, str], Served] = defaultdict(Served)
        self.link_bytes_per_s = 0.0  # measured while sending; what compression is weighed against

    def offer(self, file_id: str, path: Path) -> None:
        self.offered[file_id] = path

    def report(self) -> list[dict[str, object]]:
        """Per (node, file): bytes sent and wants answered, for /api/distributed/models."""
        return [
            {"node": node, "file": file, "bytes_sent": s.bytes, "wants": s.wants, "compressed_answers": s.compressed}
            for (node, file), s in sorted(self.sent.items())
        ]

    async def serve(self, node_rank: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one rank's wants until it closes the connection (or stays idle for IDLE_S)."""
        while True:
            try:
                msg = await asyncio.wait_for(wire.read_message(reader), IDLE_S)
            except TimeoutError:
                return
            if msg is None:
                return
            if not isinstance(msg, wire.Want):
                log.warning("node %d's reader sent %s, expected a want; closing it", node_rank, type(msg).__name__)
                return
            try:
                raw = await asyncio.to_thread(self._read, msg)
            except FileError as e:
                writer.write(wire.frame(wire.Refused(str(e))))
                await writer.drain()
                continue
            payload, compressed = await asyncio.to_thread(self._pack, raw)
            writer.write(wire.frame(wire.Data(len(payload), len(raw), compressed, hashlib.sha256(raw).hexdigest())))
            t0 = time.perf_counter()
            writer.write(payload)
            await asyncio.wait_for(writer.drain(), SEND_TIMEOUT_S)
            elapsed = time.perf_counter() - t0
            if len(payload) >= 1 << 20 and elapsed > 0:
                self.link_bytes_per_s = len(payload) / elapsed
            served = self.sent[(node_rank, msg.file)]
            served.bytes += len(payload)
            served.wants += 1
            served.compressed += compressed

    def _read(self, want: wire.Want) -> bytes:
        path = self.offered.get(want.file)
        if path is None:
            raise FileError(f"node 0 offers no file {want.file} (it serves only the files of the model it loads)")
        if len(want.ranges) > MAX_WANT_RANGES:
            raise FileError(f"a want of {len(want.ranges)} ranges; at most {MAX_WANT_RANGES}")
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise FileError(f"node 0 cannot read {want.file} ({path}): {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            total = 0
            for a, b in want.ranges:
                if not 0 <= a < b <= size:
                    raise FileError(f"range {a}:{b} of {want.file} is outside its {size} bytes")
                total += b - a
            if total > MAX_WANT_BYTES:
                raise FileError(f"a want of {total} bytes; at most {MAX_WANT_BYTES}")
            parts = [os.pread(fd, b - a, a) for a, b in want.ranges]
        finally:
            os.close(fd)
        return b"".join(parts)

    def _pack(self, raw: bytes) -> tuple[bytes, bool]:
        return (zlib.compress(raw, 1), True) if compression_pays(raw, self.link_bytes_per_s) else (raw, False)


def compression_pays(raw: bytes, link_bytes_per_s: float) -> bool:
    """Whether zlib (level 1) makes `raw` arrive sooner over a link of that speed (0: not measured
    yet, taken as fast): the time to compress must be less than the sending time it saves, judged on
    a sample. Quantized weights barely compress, so this is mostly no."""
    if len(raw) < 2 * SAMPLE_BYTES or link_bytes_per_s <= 0:
        return False
    sample = raw[:SAMPLE_BYTES]
    t0 = time.perf_counter()
    ratio = len(zlib.compress(sample, 1)) / len(sample)
    compress_s_per_byte = (time.perf_counter() - t0) / len(sample)
    saved_s_per_byte = (1 - ratio) / link_bytes_per_s
    return ratio < 0.9 and compress_s_per_byte < saved_s_per_byte


# --- a rank ---------------------------------------------------------------------------------------------


def connect(host: str, port: int, node_rank: int) -> Fetch:
    """How a rank of node `node_rank` fetches byte ranges from node 0 at host:port (the rank's host
    process is given this: tp_ollama.engine.host.standby)."""
    return FileSource(host, port, node_rank, wire.configured_secret("")).fetch


class FileSource:
    """A rank's connection to node 0's files (opened at the first fetch, reopened after a failure)."""

    ATTEMPTS = 3

    def __init__(self, host: str, port: int, node_rank: int, secret: str, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.node_rank, self.secret = host, port, node_rank, secret
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.received = 0  # bytes that came over the link (compressed as sent)

    @property
    def where(self) -> str:
        return f"node 0 at {self.host}:{self.port}"

    def fetch(self, file_id: str, ranges: Sequence[tuple[int, int]]) -> bytes:
        """The bytes of `ranges` of `file_id`, back to back: checked against node 0's sha256, tried
        again on a new connection after a failure (ATTEMPTS in all, a second, then two, between)."""
        last: Exception | None = None
        for attempt in range(self.ATTEMPTS):
            if attempt:
                time.sleep(float(attempt))
            try:
                return self._fetch_once(file_id, list(ranges))
            except FileError:
                raise
            except (OSError, ConnectionError, ValueError) as e:
                last = e
                log.warning("fetching %s from %s failed (attempt %d): %s", file_id, self.where, attempt + 1, e)
                self.close()
        raise FileError(f"fetching {file_id} from {self.where} failed {self.ATTEMPTS} times: {last}")

    def _fetch_once(self, file_id: str, ranges: list[tuple[int, int]]) -> bytes:
        sock = self._connected()
        sock.sendall(wire.frame(wire.Want(file_id, ranges)))
        head = self._recv_message(sock)
        if isinstance(head, wire.Refused):
            raise FileError(f"{self.where} refused {file_id}: {head.why}")
        if not isinstance(head, wire.Data):
            raise ValueError(f"{self.where} answered {type(head).__name__}, expected data")
        payload = recv_exact(sock, head.size, self.timeout_s, "an answer")
        self.received += len(payload)
        raw = zlib.decompress(payload) if head.compressed else payload
        expected = sum(b - a for a, b in ranges)
        if len(raw) != expected or len(raw) != head.raw_size:
            raise ValueError(f"{len(raw)} bytes of {file_id} arrived, {expected} were asked for")
        if hashlib.sha256(raw).hexdigest() != head.sha256:
            raise ValueError(f"the bytes of {file_id} from {self.where} do not match their checksum")
        return raw

    def _recv_message(self, sock: socket.socket) -> wire.Message:
        """One frame, read to its last byte and no further (raw bytes may follow it)."""
        (size,) = FRAME_HEADER.unpack(recv_exact(sock, FRAME_HEADER.size, self.timeout_s, "an answer"))
        if size > wire.MAX_FRAME:
            raise ValueError(f"{self.where} sent a frame of {size} bytes; at most {wire.MAX_FRAME}")
        return wire.decode(recv_exact(sock, size, self.timeout_s, "an answer"))

    def _connected(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        try:
            challenge = self._recv_message(sock)
            if not isinstance(challenge, wire.Challenge):
                raise ValueError(f"{self.where} opened with {type(challenge).__name__}, expected a challenge")
            nonce = wire.new_nonce()
            proof = wire.reader_mac(self.secret, challenge.nonce, self.node_rank, nonce)
            sock.sendall(wire.frame(wire.Reader(self.node_rank, nonce, proof)))
            answer = self._recv_message(sock)
            if isinstance(answer, wire.Refused):
                raise FileError(f"{self.where} refused this rank: {answer.why}")
            if not isinstance(answer, wire.Welcome):
                raise ValueError(f"{self.where} answered {type(answer).__name__}, expected a welcome")
            if not wire.proves(self.secret, wire.welcome_mac(self.secret, nonce), answer.mac):
                raise FileError(f"{self.where} did not prove the cluster secret")
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
