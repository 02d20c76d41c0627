"""A worker node's agent (`tp-ollama launch --node-rank N`, N > 0): it stays connected to node 0's
coordinator and runs this node's engine ranks for whichever group node 0 forms.

The agent outlives its ranks. Node 0 says `Form` (this node's place in a new group, and where the
group's store is), the agent starts its ranks as a child process session, and reports when they end
by themselves (`Exited`) or hang stopped (`Hung`). `Stop` ends them (they are killed: a group's
ranks hold nothing that outlives it), so a rank of an old group can never talk to a new one. Both
sides send a heartbeat every second; silence for the detect timeout (a hung node, a cut link) counts
as a lost connection. Having lost node 0, the agent kills its ranks and connects again, for as long
as the join timeout, and joins the next group it forms: that is how a restarted node rejoins.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import time
from typing import Any

from tp_ollama.engine.host import GroupSpec, HostLauncher
from tp_ollama.errors import TpOllamaError
from tp_ollama.launch import Cluster
from tp_ollama.membership import wire
from tp_ollama.membership.watch import StoppedWatch, kill_session

log = logging.getLogger(__name__)

RETRY_S = 0.5  # between two attempts to reach node 0
POLL_S = 0.1  # how often the agent looks at its socket and its ranks
STOP_WAIT_S = 5.0  # a killed session's leader is reaped within this long
READY_AFTER_S = 5.0


class Fatal(TpOllamaError):
    """Node 0 refused this node for a reason that trying again will not change."""


class NodeAgent:
    def __init__(self, cluster: Cluster, secret: str, device: str = "cpu", stores: tuple[str, ...] = ()) -> None:
        self.cluster, self.secret, self.device = cluster, secret, device
        self.stores = stores  # this node's model store, then its extra stores
        # Given none, the agent reads node 0's secret file at every attempt: on one machine (or a shared
        # home) node 0 may write it a moment after this node starts.
        self.secret_given = bool(secret)
        self.child: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # when the running group's ranks were started
        self.launcher = HostLauncher(env={**os.environ, wire.SECRET_ENV: secret})
        self.generation = 0
        self.hung_reported = False
        self.watch = StoppedWatch()
        self.heartbeat_s = 1.0
        self.detect_timeout_s = 5.0
        self.frames = wire.Frames()  # what node 0 sent that is not handled yet, from the handshake on

    # --- the outer loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve node 0 until it says Bye (return) or stays unreachable for the join timeout (raise)."""
        c = self.cluster
        unreachable_since = time.monotonic()
        try:
            while True:
                sock = self._connect(unreachable_since + c.join_timeout_s)
                try:
                    if self._serve(sock):
                        return
                finally:
                    sock.close()
                    self._stop_child()
                unreachable_since = time.monotonic()
                log.warning("lost node 0 at %s:%d; connecting again", c.master_addr, c.master_port)
        finally:
            self._stop_child()
            self.launcher.close()

    def _connect(self, deadline: float) -> socket.socket:
        c = self.cluster
        last = "no answer"
        while True:
            if not self.secret_given:
                self.secret = wire.configured_secret("")
            try:
                sock = socket.create_connection((c.master_addr, c.master_port), timeout=5.0)
            except OSError as e:
                last = str(e)
            else:
                try:
                    self._handshake(sock)
                    log.info("joined node 0 at %s:%d as node %d", c.master_addr, c.master_port, c.node_rank)
                    return sock
                except Fatal:
                    sock.close()
                    raise
                except (OSError, ConnectionError, ValueError, TpOllamaError) as e:
                    sock.close()
                    last = str(e)
            if time.monotonic() > deadline:
                raise TpOllamaError(
                    f"node 0 at {c.master_addr}:{c.master_port} did not take this node within "
                    f"{c.join_timeout_s:g} s: {last}"
                )
            time.sleep(RETRY_S)

    def _handshake(self, sock: socket.socket) -> None:
        frames = wire.Frames()
        challenge = wire.recv_one(sock, frames, 10.0)
        if not isinstance(challenge, wire.Challenge):
            raise ValueError(f"node 0 opened with {type(challenge).__name__}, expected a challenge")
        c = self.cluster
        host, pid, nonce = socket.gethostname(), os.getpid(), wire.new_nonce()
        proof = wire.hello_mac(self.secret, challenge.nonce, c.node_rank, c.nproc_per_node, host, pid, nonce)
        sock.sendall(wire.frame(wire.Hello(c.node_rank, c.nproc_per_node, host, pid, nonce, proof)))
        answer = wire.recv_one(sock, frames, 10.0)
        if isinstance(answer, wire.Refused):
            if answer.why.startswith("again:"):
                raise TpOllamaError(answer.why.removeprefix("again:").strip())
            if answer.why.startswith(wire.WRONG_SECRET) and not self.secret_given:
                raise TpOllamaError(
                    f"node 0 refused this node: {answer.why}; set {wire.SECRET_ENV} to node 0's "
                    f"(node 0 printed it, and saved it in {wire.secret_file()} on its machine)"
                )
            raise Fatal(f"node 0 refused this node: {answer.why}")
        if not isinstance(answer, wire.Welcome):
            raise ValueError(f"node 0 answered {type(answer).__name__}, expected a welcome")
        if not wire.proves(self.secret, wire.welcome_mac(self.secret, nonce), answer.mac):
            raise Fatal("node 0 did not prove the cluster secret: is another server listening on its port?")
        self.heartbeat_s, self.detect_timeout_s = answer.heartbeat_s, answer.detect_timeout_s
        self.frames = frames

    # --- one connection ---------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> bool:
        """Follow node 0's word on this connection: True when it said Bye, False when it was lost."""
        sock.settimeout(self.detect_timeout_s)
        heard = sent = time.monotonic()
        frames = self.frames
        while True:
            now = time.monotonic()
            try:
                while frames.ready:
                    if self._handle(frames.ready.popleft(), sock):
                        return True
                if now - sent >= self.heartbeat_s:
                    sock.sendall(wire.frame(wire.Beat()))
                    sent = now
                readable, _, _ = select.select([sock], [], [], POLL_S)
                if readable:
                    data = sock.recv(65536)
                    if not data:
                        log.warning("node 0 closed the connection")
                        return False
                    frames.feed(data)
                    heard = time.monotonic()
                for msg in self._check_child():
                    sock.sendall(wire.frame(msg))
            except (OSError, ValueError) as e:
                log.warning("the connection to node 0 failed: %s", e)
                return False
            if time.monotonic() - heard > self.detect_timeout_s:
                log.warning("no word from node 0 for %.1f s", time.monotonic() - heard)
                return False

    def _handle(self, msg: Any, sock: socket.socket) -> bool:
        if isinstance(msg, wire.Form):
            self._stop_child()
            self._start_child(msg)
        elif isinstance(msg, wire.Stop):
            if self.generation <= msg.generation:
                self._stop_child()
            sock.sendall(wire.frame(wire.Stopped(msg.generation)))
        elif isinstance(msg, wire.Bye):
            log.info("node 0 is shutting down")
            self._stop_child(grace_s=10.0)
            return True
        return False

    # --- this node's ranks ------------------------------------------------------------------------

    def _start_child(self, form: wire.Form) -> None:
        spec = GroupSpec(
            ranks=form.ranks, world_size=form.world_size,
            master_addr=form.master_addr, master_port=form.master_port, comm=form.comm, device=self.device,
            tp_weights=form.tp_weights, join_timeout_s=form.join_timeout_s, max_running=form.max_running,
            kv_cache_bytes=form.kv_cache_bytes, prefix_cache=form.prefix_cache,
            files_from=f"{self.cluster.master_addr}:{self.cluster.master_port}", node_rank=form.node_rank,
            stores=self.stores, keep_copy=form.node_rank < form.min_replicas, pp=form.pp, pp_weights=form.pp_weights,
            strategy=form.strategy, memory_budget=form.memory_budget,
        )  # fmt: skip
        self.child = self.launcher.start(spec)
        self.started = time.monotonic()
        self.generation = form.generation
        self.hung_reported = False
        self.watch.reset()
        log.info("generation %d: node %d of %d, ranks %s of %d", form.generation, form.node_rank, form.nnodes,
                 ",".join(map(str, form.ranks)), form.world_size)  # fmt: skip

    def _check_child(self) -> list[Any]:
        child = self.child
        if child is None or time.monotonic() - self.started > READY_AFTER_S:
            # The next group's host, once this one's ranks are past their start (they need the cores).
            self.launcher.prepare()
        if child is None:
            return []
        code = child.poll()
        if code is not None:
            self.child = None
            # Whatever is left of the session (a rank the launcher could not reap) goes too.
            kill_session(child.pid, signal.SIGKILL)
            log.warning("generation %d: this node's ranks exited with status %d", self.generation, code)
            return [wire.Exited(self.generation, code)]
        if not self.hung_reported:
            why = self.watch.check(child.pid)
            if why is not None:
                self.hung_reported = True
                log.warning("generation %d: %s", self.generation, why)
                return [wire.Hung(self.generation, why)]
        return []

    def _stop_child(self, grace_s: float = 0.0) -> None:
        """End this node's ranks (a Bye lets them leave by themselves first, for `grace_s`)."""
        child, self.child = self.child, None
        if child is None:
            return
        if grace_s > 0:
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        kill_session(child.pid, signal.SIGKILL)
        try:
            child.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("generation %d: this node's ranks did not exit after SIGKILL", self.generation)
