"""Collectives over a full mesh of persistent TCP sockets, for ranks on different hosts.

Every message is a 16-byte header (op, sequence number, payload length) and the payload. Each pair of ranks
has one connection, so messages between two ranks arrive in the order sent and no round counter is needed;
the header still lets a rank whose peer called a different collective fail at once with both names.

all_reduce is one exchange: every rank sends its tensor to every peer and sums what it receives in rank order.
Sends and receives make progress together on non-blocking sockets, so messages larger than the socket
buffers cannot deadlock two ranks that both send first.

Emulated latency: with TP_OLLAMA_LINK_DELAY_US=N in the environment, every message this rank sends waits N µs
before it goes on the wire: a one-way propagation delay, as synchronous collectives see it (an all-reduce
costs N µs more, a request-reply 2N). The simulated cluster (launch/netns-cluster.sh) needs a link slower
than a veth pair, and the kernel's own tool for that, `tc qdisc ... netem delay`, is missing on the kernels
we run on ("Specified qdisc kind is unknown") while tbf, which only limits the rate, works; holding the
message here gives the same latency on any kernel. It covers this mesh only, not gloo or the rendezvous
store. The variable is read once when the transport is created; unset or 0 adds nothing to the hot path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import select
import socket
import struct
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.fastcomm_base import (
    OPS,
    CommError,
    ViewCache,
    op_name,
    store_get_all,
    sum_in_rank_order,
    too_big_message,
)

HEADER = struct.Struct("<IIq")  # op, sequence number mod 2**32, payload bytes (negative: refused, see below)
HELLO = struct.Struct("<4sIQ")  # magic, rank, group token: the connecting rank's first bytes
MAGIC = b"TPFC"
NONCE_BYTES = 16  # the accepting rank's challenge, sent first on every connection
MAC_BYTES = 32  # HMAC-SHA256 of the challenge and the hello under the cluster secret, after the hello
SECRET_ENV = "TP_OLLAMA_CLUSTER_SECRET"

log = logging.getLogger(__name__)

AR, BC, AG, BB, BAR = (OPS[k] for k in ("all_reduce", "broadcast", "all_gather", "broadcast_bytes", "barrier"))

LINK_DELAY_ENV = "TP_OLLAMA_LINK_DELAY_US"
MAX_LINK_DELAY_US = 10_000_000  # 10 s: longer than any real link, short of every collective's timeout
# A held message spins, yielding the core to anything else runnable, up to this long; a longer delay sleeps
# the rest first. Sleeping through short holds would add the wake-up latency of an idle core (100-300 µs
# on the VMs measured, more than the delays emulated) and cool the caches the next layer needs.
SPIN_HOLD_S = 2e-3


def link_delay_s(environ: Mapping[str, str]) -> float:
    """The emulated one-way delay in seconds from TP_OLLAMA_LINK_DELAY_US (whole µs; unset or empty: 0)."""
    raw = environ.get(LINK_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    if not raw.isdecimal() or int(raw) > MAX_LINK_DELAY_US:
        raise ConfigError(
            f"{LINK_DELAY_ENV}={raw!r} is invalid: expected a whole number of microseconds from 0 to "
            f"{MAX_LINK_DELAY_US}, e.g. 200"
        )
    return int(raw) * 1e-6


def hold(seconds: float) -> None:
    """Return `seconds` from now, to within a few µs: sleep what exceeds SPIN_HOLD_S, then spin with
    sched_yield, which keeps the core awake yet lets other runnable threads (ranks sharing it) go first."""
    end = time.perf_counter() + seconds
    if seconds > SPIN_HOLD_S:
        time.sleep(seconds - SPIN_HOLD_S)
    while time.perf_counter() < end:
        os.sched_yield()


class TcpTransport:
    name = "tcp"

    def __init__(
        self,
        socks: dict[int, socket.socket],
        rank: int,
        world_size: int,
        max_bytes: int,
        timeout: float,
        spin_s: float,
        delay_s: float = 0.0,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.max_bytes = max_bytes
        self.delay_s = delay_s  # emulated one-way link delay (see the module docstring)
        self._timeout = timeout
        self._spin_s = spin_s
        self._peers = [p for p in range(world_size) if p != rank]
        self._socks = socks
        for s in socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a 2.5 KB all-reduce must not wait for ACKs
            s.setblocking(False)
        size = HEADER.size + max_bytes
        self._send = bytearray(size)
        self._send_mv = memoryview(self._send)
        self._recv = {p: bytearray(size) for p in self._peers}
        self._recv_mv = {p: memoryview(b) for p, b in self._recv.items()}
        payloads = [
            torch.frombuffer(self._send if p == rank else self._recv[p], dtype=torch.uint8)[HEADER.size :]
            for p in range(world_size)
        ]
        self._views = ViewCache([payloads])  # payload views in rank order, this rank's own being its send buffer
        self._seq = 0
        self._closed = False

    @classmethod
    def connect(
        cls,
        store: dist.Store,
        prefix: str,
        token: int,
        rank: int,
        world_size: int,
        max_bytes: int,
        timeout: float,
        spin_s: float,
    ) -> TcpTransport:
        """Collective: listen, publish host:port through the store, connect to every lower rank and accept
        every higher one. Each accepted connection must prove the cluster secret (TP_OLLAMA_CLUSTER_SECRET,
        empty on one node): the accepting rank sends a random challenge, the connecting rank answers with
        its hello (its rank and the group's `token`) and their HMAC; anything else is dropped and logged.
        The emulated link delay is read from the environment here, before any socket is opened."""
        delay_s = link_delay_s(os.environ)
        secret = os.environ.get(SECRET_ENV, "").encode()
        family, ip = _local_address(store)
        listener = socket.socket(family, socket.SOCK_STREAM)
        socks: dict[int, socket.socket] = {}
        try:
            listener.bind((ip, 0))
            listener.listen(world_size)
            store.set(f"{prefix}tcp/{rank}", json.dumps({"ip": ip, "port": listener.getsockname()[1]}))
            keys = [f"{prefix}tcp/{p}" for p in range(world_size)]
            addrs = [json.loads(v) for v in store_get_all(store, keys, timeout, "TCP addresses", rank)]
            deadline = time.monotonic() + timeout
            for p in range(rank):
                try:
                    s = socket.create_connection((addrs[p]["ip"], addrs[p]["port"]), timeout=timeout)
                    socks[p] = s
                    nonce = recv_exact(s, NONCE_BYTES, timeout)
                    hello = HELLO.pack(MAGIC, rank, token)
                    s.sendall(hello + hmac.new(secret, nonce + hello, hashlib.sha256).digest())
                except OSError as e:
                    raise CommError(f"fastcomm setup: rank {rank} cannot connect to rank {p} at {addrs[p]}: {e}") from e
            while len(socks) < world_size - 1:
                left = deadline - time.monotonic()
                missing = [p for p in range(rank + 1, world_size) if p not in socks]
                if left <= 0:
                    raise CommError(
                        f"fastcomm setup: rank {rank} waited {timeout:g} s for connections from rank(s) "
                        f"{', '.join(map(str, missing))}"
                    )
                listener.settimeout(left)
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                peer = _read_hello(conn, token, secret, world_size, min(left, 5.0))
                if peer is None or peer <= rank or peer in socks:
                    log.warning("rank %d dropped a mesh connection that did not prove the group and its secret", rank)
                    conn.close()  # not one of ours: keep waiting for the real peer
                    continue
                socks[peer] = conn
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        finally:
            listener.close()
        return cls(socks, rank, world_size, max_bytes, timeout, spin_s, delay_s)

    def all_reduce(self, flat: torch.Tensor) -> None:
        seq = self._next()
        nbytes = flat.nbytes
        views = self._views.get(0, flat.dtype, flat.numel())
        views[self.rank].copy_(flat)
        HEADER.pack_into(self._send, 0, AR, seq, nbytes)
        n = HEADER.size + nbytes
        self._exchange("all_reduce", seq, self._peers, n, self._peers, 0, n, nbytes)
        sum_in_rank_order(views, flat)

    def broadcast(self, flat: torch.Tensor, src: int) -> None:
        seq = self._next()
        nbytes = flat.numel()
        views = self._views.get(0, torch.uint8, nbytes)
        n = HEADER.size + nbytes
        if self.rank == src:
            views[src].copy_(flat)
            HEADER.pack_into(self._send, 0, BC, seq, nbytes)
            self._exchange("broadcast", seq, self._peers, n, [], 0, 0, nbytes)
        else:
            self._exchange("broadcast", seq, [], 0, [src], 0, n, nbytes)
            flat.copy_(views[src])

    def all_gather(self, flat: torch.Tensor) -> torch.Tensor:
        seq = self._next()
        nbytes = flat.numel()
        views = self._views.get(0, torch.uint8, nbytes)
        views[self.rank].copy_(flat)
        HEADER.pack_into(self._send, 0, AG, seq, nbytes)
        n = HEADER.size + nbytes
        self._exchange("all_gather", seq, self._peers, n, self._peers, 0, n, nbytes)
        return torch.stack(views)  # (world_size, nbytes)

    def broadcast_bytes(self, data: bytes | None, src: int, big_ok: bool) -> bytes | int:
        """bytes, or the length the source announced when it exceeds max_bytes (the caller moves it)."""
        seq = self._next()
        h = HEADER.size
        if self.rank == src:
            assert data is not None  # FastGroup checks the source passed bytes
            n = len(data)
            if n <= self.max_bytes:
                HEADER.pack_into(self._send, 0, BB, seq, n)
                self._send_mv[h : h + n] = data
                self._exchange("broadcast_bytes", seq, self._peers, h + n, [], 0, 0, None)
                return bytes(data)
            # Announce the length so the others fall back with us (or fail with us) instead of waiting.
            HEADER.pack_into(self._send, 0, BB, seq, n if big_ok else -n)
            self._exchange("broadcast_bytes", seq, self._peers, h, [], 0, 0, None)
            if not big_ok:
                raise CommError(too_big_message(src, n, self.max_bytes))
            return n
        # The length comes first: read exactly the header, since src's next message may follow the payload.
        self._exchange("broadcast_bytes", seq, [], 0, [src], 0, h, None)
        n = HEADER.unpack_from(self._recv[src], 0)[2]
        if n < 0:
            raise CommError(too_big_message(src, -n, self.max_bytes))
        if n > self.max_bytes:
            return n
        if n:
            self._exchange("broadcast_bytes", seq, [], 0, [src], h, h + n, None)
        return bytes(self._recv_mv[src][h : h + n])

    def barrier(self) -> None:
        seq = self._next()
        HEADER.pack_into(self._send, 0, BAR, seq, 0)
        self._exchange("barrier", seq, self._peers, HEADER.size, self._peers, 0, HEADER.size, 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._socks.values():
            s.close()
        self._views.clear()

    def _next(self) -> int:
        if self._closed:
            raise CommError(f"the TCP group of rank {self.rank} is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _exchange(
        self, op: str, seq: int, to: list[int], nsend: int, frm: list[int], rstart: int, rstop: int, expect: int | None
    ) -> None:
        """Send the send buffer's first nsend bytes to every rank in `to` while receiving bytes [rstart, rstop)
        of each `frm` rank's buffer. Spin on non-blocking calls for spin_s, then block in poll()."""
        socks, smv, rmv = self._socks, self._send_mv[:nsend], self._recv_mv
        sends = [[p, 0] for p in to if nsend]  # rank, bytes sent
        recvs = [[p, rstart] for p in frm if rstart < rstop]  # rank, bytes in its buffer
        if self.delay_s and sends:
            hold(self.delay_s)  # the emulated link: what this rank sends reaches its peers delay_s later
        spin_end = deadline = 0.0
        while sends or recvs:
            progress = False
            for item in sends:
                p, off = item
                try:
                    item[1] = off + socks[p].send(smv[off:])
                    progress = True
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise CommError(f"{op}: rank {self.rank} lost its connection to rank {p}: {e}") from e
            for item in recvs:
                p, off = item
                try:
                    got = socks[p].recv_into(rmv[p][off:rstop])
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise CommError(f"{op}: rank {self.rank} lost its connection to rank {p}: {e}") from e
                if got == 0:
                    raise CommError(f"{op}: rank {p} closed its connection to rank {self.rank} (did it exit?)")
                if off < HEADER.size <= off + got:
                    self._check(p, op, seq, expect)
                item[1] = off + got
                progress = True
            sends = [s for s in sends if s[1] < nsend]
            recvs = [r for r in recvs if r[1] < rstop]
            if progress or not (sends or recvs):
                continue
            now = time.perf_counter()
            if deadline == 0.0:
                spin_end, deadline = now + self._spin_s, now + self._timeout
            if now < spin_end:
                continue
            if now >= deadline:
                waiting = sorted({s[0] for s in sends} | {r[0] for r in recvs})
                raise CommError(
                    f"{op}: rank {self.rank} waited {self._timeout:g} s (the timeout) for rank(s) "
                    f"{', '.join(map(str, waiting))}; a peer died, hangs, or skipped a collective"
                )
            masks: dict[int, int] = {}
            for p, _ in sends:
                masks[socks[p].fileno()] = select.POLLOUT
            for p, _ in recvs:
                fd = socks[p].fileno()
                masks[fd] = masks.get(fd, 0) | select.POLLIN
            poller = select.poll()
            for fd, mask in masks.items():
                poller.register(fd, mask)
            poller.poll(max(1, math.ceil((deadline - now) * 1000)))

    def _check(self, p: int, op: str, seq: int, expect: int | None) -> None:
        code, got_seq, nbytes = HEADER.unpack_from(self._recv[p], 0)
        if code != OPS[op] or got_seq != seq or (expect is not None and nbytes != expect):
            raise CommError(
                f"{op}: rank {p} sent {op_name(code)} #{got_seq} of {nbytes} bytes while rank {self.rank} is in "
                f"{op} #{seq}" + ("" if expect is None else f" of {expect} bytes") + ": the ranks called different "
                "collectives"
            )


def _local_address(store: dist.Store) -> tuple[socket.AddressFamily, str]:
    """The address of the interface this host uses to reach the store's host (peers reach us the same way)."""
    s: object = store
    while s is not None and not getattr(s, "host", None):
        s = getattr(s, "underlying_store", None)  # PrefixStore wraps the TCPStore init_process_group made
    host = getattr(s, "host", None)
    if host:
        try:
            info = socket.getaddrinfo(host, getattr(s, "port", 1) or 1, type=socket.SOCK_DGRAM)[0]
            with socket.socket(info[0], socket.SOCK_DGRAM) as u:
                u.connect(info[4])  # UDP connect sends nothing; it only picks the route and source address
                return info[0], u.getsockname()[0]
        except OSError:
            pass
    try:
        return socket.AF_INET, socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.AF_INET, "127.0.0.1"


def recv_exact(conn: socket.socket, n: int, timeout: float, during: str = "the handshake") -> bytes:
    """n bytes from `conn`, each wait at most `timeout`; ConnectionError naming `during` if it closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    conn.settimeout(timeout)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"the peer closed the connection during {during}")
        got += k
    return bytes(buf)


def _read_hello(conn: socket.socket, token: int, secret: bytes, world_size: int, timeout: float) -> int | None:
    """Challenge a new connection; the peer's rank when it proves the group and the secret, else None."""
    nonce = os.urandom(NONCE_BYTES)
    try:
        conn.settimeout(timeout)
        conn.sendall(nonce)
        data = recv_exact(conn, HELLO.size + MAC_BYTES, timeout)
    except OSError:
        return None
    hello, mac = data[: HELLO.size], data[HELLO.size :]
    magic, peer, their_token = HELLO.unpack(hello)
    expected = hmac.new(secret, nonce + hello, hashlib.sha256).digest()
    if magic != MAGIC or their_token != token or not 0 <= peer < world_size or not hmac.compare_digest(mac, expected):
        return None
    return peer
