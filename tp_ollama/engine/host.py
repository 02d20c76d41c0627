"""A node's engine ranks for `serve` and `launch`, started without torchrun's agent: one host process
per node and group, which imports torch once, then forks this node's ranks and watches them.

The host can be started before anyone knows the group it will run (`standby`): it imports what a
rank needs and waits for a `GroupSpec` line on its stdin. The front end and each node's agent keep
one such process ready, so a group formed after a failure skips the interpreter start and the
import of torch (seconds on a small machine, more than loading a small model from the page cache).

Ranks join with torch.distributed's environment (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; global
rank 0, on node 0, hosts the store). The first rank to fail takes this node's others down and the
host exits with its status, as torchrun's agent would; every process here dies with its parent.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import msgspec

from tp_ollama.store.partial import Fetch

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# (node 0's host, its port, this node's rank) -> how to fetch byte ranges of node 0's files
FilesSource = Callable[[str, int, int], Fetch]


class GroupSpec(msgspec.Struct, frozen=True):
    """One node's part of one engine group."""

    ranks: tuple[int, ...]  # the group's ranks on this node (global indices)
    world_size: int
    master_addr: str
    master_port: int
    socket_path: str = ""  # node 0: where rank 0 serves the front end
    comm: str = "auto"
    device: str = "cpu"
    tp_weights: str | None = None
    pp: int = 1  # pipeline stages (tp_ollama.parallel.pipeline)
    pp_weights: str | None = None
    strategy: str = "tensor"  # inference.partitioning.strategy ("auto": chosen at each load)
    memory_budget: int = 0  # inference.partitioning.memory_budget
    join_timeout_s: float = 120.0
    max_running: int = 16
    kv_cache_bytes: int | None = None
    prefix_cache: bool = True
    # A node other than node 0: node 0's rendezvous address (host:port, where its model files are
    # read), this node's rank and stores, and whether it keeps full copies of the files it reads.
    files_from: str = ""
    node_rank: int = 0
    stores: tuple[str, ...] = ()
    keep_copy: bool = False

    def line(self) -> bytes:
        return msgspec.json.encode(self) + b"\n"


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (a killed agent takes its ranks along)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def standby(files: FilesSource | None = None) -> int:
    """Import what a rank needs, then run the group the first line of stdin describes (none: exit 0).
    `files`: how a rank of a node other than node 0 reaches node 0's model files (the caller's
    tp_ollama.membership.files.connect; this layer does not know the cluster's wire)."""
    die_with_parent()
    import torch  # noqa: F401  (the point of waiting here is to have paid for this import already)

    import tp_ollama.engine.loop  # noqa: F401
    from tp_ollama.kernels import native

    native.library()
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    return host(msgspec.json.decode(line, type=GroupSpec), files)


def host(spec: GroupSpec, files: FilesSource | None = None) -> int:
    """Fork this node's ranks and wait for them: 0 when all ended well, else the first failure's status."""
    ranks: dict[int, int] = {}
    for local in range(len(spec.ranks)):
        pid = os.fork()
        if pid == 0:
            os._exit(_rank(spec, local, files))
        ranks[pid] = spec.ranks[local]
    status = 0
    while ranks:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        rank = ranks.pop(pid, None)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
            if code < 0:
                log.error("engine rank %s was killed by signal %d", rank, -code)
            for other in ranks:  # the group cannot go on without it
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return status


def _rank(spec: GroupSpec, local: int, files: FilesSource | None) -> int:
    """One forked rank: its environment, then the serving loop. Its exit status."""
    from tp_ollama.engine.loop import engine_main
    from tp_ollama.engine.model_files import FilesFrom
    from tp_ollama.engine.state import EngineJob
    from tp_ollama.errors import TpOllamaError
    from tp_ollama.launch import REPORTED_EXIT, parse_weights

    die_with_parent()
    rank = spec.ranks[local]
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(spec.world_size), LOCAL_WORLD_SIZE=str(len(spec.ranks)),
        MASTER_ADDR=spec.master_addr, MASTER_PORT=str(spec.master_port),
    )  # fmt: skip
    files_from = None
    if spec.files_from and files is not None:
        host, _, port = spec.files_from.rpartition(":")
        connect = functools.partial(files, host, int(port), spec.node_rank)
        files_from = FilesFrom(spec.node_rank, connect, spec.stores, keep_copy=spec.keep_copy)
    job = EngineJob(
        socket_path=spec.socket_path, comm=spec.comm, device=spec.device, tp_weights=parse_weights(spec.tp_weights),
        timeout_s=spec.join_timeout_s, max_running=spec.max_running, kv_cache_bytes=spec.kv_cache_bytes,
        prefix_cache=spec.prefix_cache, files_from=files_from, pp=spec.pp, pp_weights=parse_weights(spec.pp_weights),
        strategy=spec.strategy, memory_budget=spec.memory_budget,
    )  # fmt: skip
    code = 0
    try:
        engine_main(job)
    except TpOllamaError as e:
        sys.stderr.write(f"Error: engine rank {rank} failed: {e}\n")
        code = REPORTED_EXIT
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:
        log.debug("engine rank %d failed", rank, exc_info=True)
        sys.stderr.write(f"Error: engine rank {rank} failed: {type(e).__name__}: {e}\n")
        code = REPORTED_EXIT
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


class HostLauncher:
    """Starts a node's engine groups, each through a host process (`tp-ollama engine`) started ahead
    of time when `keep_ready`: the next group's host is prepared once the current one runs."""

    def __init__(self, env: dict[str, str] | None = None, keep_ready: bool = True) -> None:
        self.env, self.keep_ready = env, keep_ready
        self._ready: subprocess.Popen[bytes] | None = None

    def start(self, spec: GroupSpec) -> subprocess.Popen[bytes]:
        """A host running `spec`: the one kept ready if it is alive, else a new one."""
        proc, self._ready = self._ready, None
        if proc is None or proc.poll() is not None:
            proc = self._spawn()
        assert proc.stdin is not None
        try:
            proc.stdin.write(spec.line())
            proc.stdin.close()
        except OSError:  # it died while waiting: start one for this group
            proc = self._spawn()
            assert proc.stdin is not None
            proc.stdin.write(spec.line())
            proc.stdin.close()
        return proc

    def prepare(self) -> None:
        """Have a host ready for the next group (each takes a few hundred MB once torch is imported)."""
        if self.keep_ready and (self._ready is None or self._ready.poll() is not None):
            self._ready = self._spawn()

    def close(self) -> None:
        proc, self._ready = self._ready, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Its own session, so stopping a group takes every rank with it and nothing else.
        cmd = [sys.executable, "-m", "tp_ollama", "engine"]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True, env=self.env)
