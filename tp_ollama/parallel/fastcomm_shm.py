"""Collectives through one POSIX shared-memory segment, for ranks on one host.

Layout (bytes):
    [ control: world_size lines of LINE bytes, line p holds rank p's arrive counter, the op it  ]
    [          entered that round with (the op only makes error messages precise), its process   ]
    [          id and its PID namespace (int64s)                                                 ]
    [ slots: for parity in (0, 1), for rank p: HEADER (seq, op, nbytes as int64) + payload    ]

Protocol: every collective is round r = 1, 2, ... on every rank. A rank that sends writes its payload and
header into slot (r % 2, rank), then stores r into its arrive counter; readers wait until the counters they
need reach r, check the headers, and read the slots. Slots alternate by round parity, so a rank writing round
r overwrites what it wrote in round r - 2; it first waits until every peer's counter reached r - 1, and a
peer stores r - 1 only after it has finished reading round r - 2. A rank is thus never more than one round
ahead of the slowest reader, and nobody needs a separate "done reading" counter.

A peer that exits (killed, crashed) is seen within LIVENESS_S of a wait's sleeping phase, not at the
timeout: a waiting rank looks up the process ids of the peers it waits for (when they share its PID
namespace, so the ids mean the same process), and one that is gone or a zombie fails the collective
with its rank and pid named. A peer that hangs alive is still only seen at the timeout.

Memory ordering: this relies on x86-64 total store order: stores (payload, header, then counter) become
visible to other cores in program order, and loads are not reordered with older loads, so a reader that sees
the counter at r also sees round r's payload. Counters and headers are aligned int64s written through a
memoryview (one 8-byte move each, so never seen half-written). The lock acquire/release between payload and
counter costs ~0.1 µs and is a locked instruction, which the Intel SDM (8.2.2) says reads and writes are not
reordered with: a fence in case a large copy used non-temporal stores. FastGroup only picks shm on x86-64.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import threading
import time

import torch
import torch.distributed as dist

from tp_ollama.parallel.fastcomm_base import (
    OPS,
    CommError,
    ViewCache,
    op_name,
    store_get_all,
    sum_in_rank_order,
    too_big_message,
)

SHM_DIR = "/dev/shm"
LINE = 128  # one arrive counter per 128 bytes: spinning readers of one counter don't false-share another's
HEADER = 64  # slot header (seq, op, nbytes) padded so payloads stay 64-byte aligned for vector copies
YIELD_S = 1e-3  # after spinning, sched_yield for this long: another rank may need this core (3 ranks, 2 cores)
SLEEP_S = 50e-6  # then sleep in short steps: a rank waiting through a peer's long prefill costs no CPU
LIVENESS_S = 0.1  # while sleeping, look this often whether the awaited peers' processes still exit
PID_AT, PID_NS_AT = 2, 3  # int64 index within a rank's control line of its process id and PID namespace

AR, BC, AG, BB, BAR = (OPS[k] for k in ("all_reduce", "broadcast", "all_gather", "broadcast_bytes", "barrier"))


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def segment_size(world_size: int, max_bytes: int) -> int:
    return world_size * LINE + 2 * world_size * (HEADER + _round_up(max_bytes, 64))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ShmTransport:
    name = "shm"

    def __init__(self, path: str, rank: int, world_size: int, max_bytes: int, timeout: float, spin_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.max_bytes = max_bytes
        self._path = path
        self._timeout = timeout
        self._spin_s = spin_s
        size = segment_size(world_size, max_bytes)
        fd = os.open(path, os.O_RDWR)
        try:
            found = os.fstat(fd).st_size
            if found != size:
                raise CommError(f"shared-memory segment {path} has {found} bytes, expected {size}")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._mv = memoryview(self._mm)
        self._q = self._mv.cast("q")  # the segment as int64s: counters and headers
        self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)
        stride = HEADER + _round_up(max_bytes, 64)
        offsets = [
            [world_size * LINE + (parity * world_size + p) * stride for p in range(world_size)] for parity in (0, 1)
        ]
        self._arrive = [p * LINE // 8 for p in range(world_size)]  # int64 index of rank p's counter
        self._hdr = [[off // 8 for off in row] for row in offsets]  # int64 index of slot headers, [parity][rank]
        self._payload = [[off + HEADER for off in row] for row in offsets]  # byte offset of payloads
        self._views = ViewCache([[self._buf[o : o + max_bytes] for o in row] for row in self._payload])
        self._peers = [p for p in range(world_size) if p != rank]
        # round, seen (every peer's counter was at least this when last looked at), and what the native
        # all-reduce reports (failed peer, failure, calls, nanoseconds): shared with it, so collectives
        # from Python and from a native decode step follow one sequence of rounds.
        self._state = (ctypes.c_int64 * 6)()
        own = self._arrive[rank]
        self._q[own + PID_AT], self._q[own + PID_NS_AT] = os.getpid(), pid_namespace()
        self._fence = threading.Lock()
        self._native: NativeAllReduce | None = None

    @property
    def _round(self) -> int:
        return int(self._state[0])

    @_round.setter
    def _round(self, r: int) -> None:
        self._state[0] = r

    @property
    def _seen(self) -> int:
        return int(self._state[1])

    @_seen.setter
    def _seen(self, r: int) -> None:
        self._state[1] = r

    def native_all_reduce(self) -> NativeAllReduce | None:
        """This group's all-reduce as a C function and its context (for a native decode step's
        all_reduce hook), or None where the native kernels do not run."""
        if self._native is None and self._round >= 0:
            from tp_ollama.kernels import native

            lib = native.library()
            if lib is None:
                return None
            self._native = NativeAllReduce(self, lib)
        return self._native

    @classmethod
    def attach(
        cls,
        store: dist.Store,
        prefix: str,
        rank: int,
        world_size: int,
        max_bytes: int,
        timeout: float,
        spin_s: float,
    ) -> tuple[ShmTransport | None, str]:
        """Collective: rank 0 creates the segment, all map it, and all unlink its name once everyone has
        mapped it, so it disappears with the last process even if one is killed. Returns (transport, "") or
        (None, why) when some rank could not create or map it."""
        key = f"{prefix}shm/0"
        if rank == 0:
            path = os.path.join(SHM_DIR, f"tp_ollama_fc_{os.getpid()}_{secrets.token_hex(6)}")
            try:
                _create(path, segment_size(world_size, max_bytes))
                store.set(key, path)
            except OSError as e:
                store.set(key, f"!rank 0 could not create {path}: {e}")
        found = store_get_all(store, [key], timeout, "the shared-memory segment name", rank)[0].decode()
        shm: ShmTransport | None = None
        status = found[1:] if found.startswith("!") else "ok"
        if status == "ok":
            try:
                shm = cls(found, rank, world_size, max_bytes, timeout, spin_s)
            except (OSError, ValueError, CommError) as e:
                status = f"rank {rank} could not map {found}: {e}"
        store.set(f"{prefix}attached/{rank}", status)
        keys = [f"{prefix}attached/{p}" for p in range(world_size)]
        try:
            results = store_get_all(store, keys, timeout, "shared-memory attach results", rank)
        except CommError:
            if shm is not None:
                shm.close()
            raise
        finally:
            if not found.startswith("!"):
                _unlink(found)
        failures = sorted({r.decode() for r in results if r != b"ok"})
        if failures:
            if shm is not None:
                shm.close()
            return None, "; ".join(failures)
        return shm, ""

    def all_reduce(self, flat: torch.Tensor) -> None:
        r = self._begin("all_reduce", writes=True)
        views = self._views.get(r & 1, flat.dtype, flat.numel())
        views[self.rank].copy_(flat)
        nbytes = flat.nbytes
        self._publish(r, AR, nbytes)
        self._wait(self._peers, r, "all_reduce")
        self._seen = r
        self._check(r, AR, self._peers, nbytes)
        sum_in_rank_order(views, flat)

    def broadcast(self, flat: torch.Tensor, src: int) -> None:
        nbytes = flat.numel()
        r = self._begin("broadcast", writes=self.rank == src)
        views = self._views.get(r & 1, torch.uint8, nbytes)
        if self.rank == src:
            views[src].copy_(flat)
            self._publish(r, BC, nbytes)
            return
        self._arrive_only(r, BC)
        self._wait([src], r, "broadcast")
        self._check(r, BC, [src], nbytes)
        flat.copy_(views[src])

    def all_gather(self, flat: torch.Tensor) -> torch.Tensor:
        nbytes = flat.numel()
        r = self._begin("all_gather", writes=True)
        views = self._views.get(r & 1, torch.uint8, nbytes)
        views[self.rank].copy_(flat)
        self._publish(r, AG, nbytes)
        self._wait(self._peers, r, "all_gather")
        self._seen = r
        self._check(r, AG, self._peers, nbytes)
        return torch.stack(views)  # (world_size, nbytes)

    def broadcast_bytes(self, data: bytes | None, src: int, big_ok: bool) -> bytes | int:
        """bytes, or the length the source announced when it exceeds max_bytes (the caller moves it)."""
        r = self._begin("broadcast_bytes", writes=self.rank == src)
        off = self._payload[r & 1][src]
        if self.rank == src:
            assert data is not None  # FastGroup checks the source passed bytes
            n = len(data)
            if n <= self.max_bytes:
                self._mv[off : off + n] = data
                self._publish(r, BB, n)
                return bytes(data)
            self._publish(r, BB, n if big_ok else -n)  # tell the others, so they fail or fall back, not wait
            if not big_ok:
                raise CommError(too_big_message(src, n, self.max_bytes))
            return n
        self._arrive_only(r, BB)
        self._wait([src], r, "broadcast_bytes")
        self._check(r, BB, [src], None)
        n = self._q[self._hdr[r & 1][src] + 2]
        if n < 0:
            raise CommError(too_big_message(src, -n, self.max_bytes))
        if n > self.max_bytes:
            return n
        return bytes(self._mv[off : off + n])

    def barrier(self) -> None:
        r = self._begin("barrier", writes=True)
        self._publish(r, BAR, 0)
        self._wait(self._peers, r, "barrier")
        self._seen = r
        self._check(r, BAR, self._peers, 0)

    def close(self) -> None:
        if self._round < 0:
            return
        self._round = -1  # the native all-reduce refuses from now on
        self._views.clear()
        # Drop every tensor and view over the mapping before unmapping it.
        del self._buf
        self._q.release()
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # NOTE: something still exports the buffer; the mapping goes when that is collected
        _unlink(self._path)  # normally already gone (unlinked at attach); this covers a failed setup

    def _begin(self, op: str, *, writes: bool) -> int:
        """Start the next round; a rank that will write its slot first waits until peers finished reading
        what it wrote two rounds ago (see the module docstring)."""
        if self._round < 0:
            raise CommError(f"{op}: the shared-memory group of rank {self.rank} is closed")
        r = self._round + 1
        if writes and self._seen < r - 1:
            self._wait(self._peers, r - 1, op)
            self._seen = r - 1
        self._round = r
        return r

    def _publish(self, r: int, op: int, nbytes: int) -> None:
        q = self._q
        h = self._hdr[r & 1][self.rank]
        q[h] = r
        q[h + 1] = op
        q[h + 2] = nbytes
        a = self._arrive[self.rank]
        q[a + 1] = op
        with self._fence:  # payload and header stores before the counter store (see the module docstring)
            pass
        q[a] = r

    def _arrive_only(self, r: int, op: int) -> None:
        """Enter round r without writing a slot (a broadcast's receivers): says 'done with round r - 1'."""
        a = self._arrive[self.rank]
        self._q[a + 1] = op
        self._q[a] = r

    def _wait(self, ranks: list[int], r: int, op: str) -> None:
        """Until every rank in `ranks` has stored at least r: spin, then yield the core, then sleep briefly."""
        q, arrive = self._q, self._arrive
        pending = [p for p in ranks if q[arrive[p]] < r]
        if not pending:
            return
        start = time.perf_counter()
        spin_end = start + self._spin_s
        yield_end = spin_end + YIELD_S
        deadline = start + self._timeout
        look = yield_end
        while True:
            pending = [p for p in pending if q[arrive[p]] < r]
            if not pending:
                return
            now = time.perf_counter()
            if now < spin_end:
                continue
            if now >= deadline:
                raise CommError(
                    f"{op}: rank {self.rank} waited {self._timeout:g} s (the timeout) for rank(s) "
                    f"{', '.join(map(str, pending))} to reach round {r}; a peer died, hangs, or skipped a collective"
                )
            if now < yield_end:
                os.sched_yield()
                continue
            if now >= look:
                look = now + LIVENESS_S
                for p in pending:
                    pid = self._exited(p)
                    if pid is not None:
                        raise CommError(peer_exited(op, self.rank, p, pid, r))
            time.sleep(SLEEP_S)

    def _exited(self, p: int) -> int | None:
        """Rank p's process id when that process has exited, else None (alive, or not ours to tell)."""
        line = self._arrive[p]
        pid, ns = int(self._q[line + PID_AT]), int(self._q[line + PID_NS_AT])
        if pid <= 0 or ns != self._q[self._arrive[self.rank] + PID_NS_AT]:
            return None
        return pid if process_exited(pid) else None

    def _check(self, r: int, op: int, ranks: list[int], nbytes: int | None) -> None:
        """Each rank read from wrote this round, with this op and size: else the ranks' calls diverged."""
        q = self._q
        for p in ranks:
            h = self._hdr[r & 1][p]
            if q[h] == r and q[h + 1] == op and (nbytes is None or q[h + 2] == nbytes):
                continue
            if q[h] == r and q[h + 1] == op:
                theirs = f"{op_name(op)} of {q[h + 2]} bytes"
            elif q[self._arrive[p]] == r:
                theirs = op_name(q[self._arrive[p] + 1])  # what p entered this round, written or not
            else:
                theirs = "a different collective"
            ours = op_name(op) + ("" if nbytes is None else f" of {nbytes} bytes")
            raise CommError(
                f"{op_name(op)}: rank {p} is in {theirs} while rank {self.rank} is in {ours} (round {r}): "
                "the ranks called different collectives"
            )


class _TpoShm(ctypes.Structure):  # tpo_shm in kernels/cpu_kernels.c
    _fields_ = [
        ("seg", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("world", ctypes.c_int64),
        ("line", ctypes.c_int64),
        ("header", ctypes.c_int64),
        ("stride", ctypes.c_int64),
        ("max_bytes", ctypes.c_int64),
        ("state", ctypes.c_void_p),
        ("timeout_s", ctypes.c_double),
        ("spin_s", ctypes.c_double),
        ("yield_s", ctypes.c_double),
        ("sleep_s", ctypes.c_double),
        ("liveness_s", ctypes.c_double),
    ]


class NativeAllReduce:
    """tpo_shm_all_reduce bound to one ShmTransport: `fn` and `ctx` for a tpo_decoder's all_reduce
    hook, `settle()` to learn what its calls did since last asked and `error()` why one failed."""

    def __init__(self, shm: ShmTransport, lib: ctypes.CDLL) -> None:
        self._shm = shm
        self._ctx = _TpoShm(
            seg=shm._buf.data_ptr(),
            rank=shm.rank,
            world=shm.world_size,
            line=LINE,
            header=HEADER,
            stride=HEADER + _round_up(shm.max_bytes, 64),
            max_bytes=shm.max_bytes,
            state=ctypes.addressof(shm._state),
            timeout_s=shm._timeout,
            spin_s=shm._spin_s,
            yield_s=YIELD_S,
            sleep_s=SLEEP_S,
            liveness_s=LIVENESS_S,
        )
        self.fn = ctypes.cast(lib.tpo_shm_all_reduce, ctypes.c_void_p).value
        self.ctx = ctypes.addressof(self._ctx)
        self._counted = (0, 0)

    def settle(self) -> tuple[int, float]:
        """(calls, seconds inside them) since the last settle."""
        calls, ns = int(self._shm._state[4]), int(self._shm._state[5])
        before_calls, before_ns = self._counted
        self._counted = (calls, ns)
        return calls - before_calls, (ns - before_ns) * 1e-9

    def error(self) -> CommError:
        """Why the last call returned 1, in the words of the Python transport."""
        st, shm = self._shm._state, self._shm
        peer, why, r = int(st[2]), int(st[3]), shm._round
        if why == 1:
            return CommError(
                f"all_reduce: rank {shm.rank} waited {shm._timeout:g} s (the timeout) for rank {peer} to reach "
                f"round {r}; a peer died, hangs, or skipped a collective"
            )
        if why == 4:
            return CommError(peer_exited("all_reduce", shm.rank, peer, int(shm._q[shm._arrive[peer] + PID_AT]), r))
        if why == 2:
            return CommError(
                f"all_reduce: rank {peer} is in a different collective while rank {shm.rank} is in all_reduce "
                f"(round {r}): the ranks called different collectives"
            )
        return CommError(
            f"all_reduce: rank {shm.rank}'s shared-memory group is closed, or the tensor exceeds max_bytes"
        )


def pid_namespace() -> int:
    """An id of this process's PID namespace (its inode), 0 where /proc cannot tell."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def process_exited(pid: int) -> bool:
    """Whether process `pid` (of this PID namespace) has exited: gone, or a zombie its parent has not
    reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


def peer_exited(op: str, rank: int, peer: int, pid: int, r: int) -> str:
    return (
        f"{op}: rank {peer} (process {pid}) exited while rank {rank} waited for it to reach round {r}; "
        "the group cannot go on without it"
    )


def _create(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Reserve the pages now: a full /dev/shm then fails here with ENOSPC, not later with SIGBUS.
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)
