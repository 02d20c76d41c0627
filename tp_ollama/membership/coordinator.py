"""Node 0's side of the membership channel: which nodes are up, and the engine group they form.

The coordinator runs in the front end's event loop. Agents of the other nodes connect to the
rendezvous port and prove the cluster secret; each is a member until its connection closes or it
stays silent for the detect timeout. A *generation* is one engine group: `form()` (called by the
EngineClient whenever it needs a group) fences the previous generation (every agent kills its
ranks), waits for enough members (all configured nodes at the first start, `min_nodes` after a
failure), and tells each one its place in a new group whose store is on a fresh port of node 0.

A running generation is broken (and the EngineClient replays its requests on the next one) when a
member of it leaves, reports its ranks exited or stopped, or, planned, when a node joins a group
that is smaller than configured: the group is stopped on purpose and formed again, larger, and its
requests resume on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tp_ollama.errors import EngineUnavailable
from tp_ollama.launch import free_port
from tp_ollama.membership import wire
from tp_ollama.membership.events import EventLog
from tp_ollama.membership.files import FileServer

log = logging.getLogger(__name__)

WATCH_S = 0.1
STOP_ACK_S = 3.0  # agents confirm their ranks are gone within this long, or are dropped


@dataclass(frozen=True)
class Formation:
    """One generation as node 0's own part of it needs it."""

    generation: int
    nnodes: int
    master_port: int
    tp_weights: str | None
    world_size: int
    ranks: tuple[int, ...]  # node 0's
    pp: int = 1  # pipeline stages


def place_ranks(nodes: list[int], nnodes: int, nproc: int, reshard: bool) -> dict[int, tuple[int, ...]]:
    """The group's ranks on each node that is up (`nodes`, node 0 first), of a cluster configured
    with `nnodes` nodes of `nproc` ranks. Node k's own ranks are k*nproc .. (k+1)*nproc-1.

    Kept (reshard false): the group keeps every configured rank, so its layout and arithmetic stay
    those of the full cluster; a missing node's ranks go to the nodes up with the fewest ranks
    (node 0, which also runs the front end, last). Resharded: the group is the nodes' own ranks
    alone, renumbered from 0 in node order (a smaller world, a new layout)."""
    if reshard:
        out: dict[int, tuple[int, ...]] = {}
        for i, node in enumerate(sorted(nodes)):
            out[node] = tuple(range(i * nproc, (i + 1) * nproc))
        return out
    placed: dict[int, list[int]] = {node: list(range(node * nproc, (node + 1) * nproc)) for node in nodes}
    for missing in range(nnodes):
        if missing in placed:
            continue
        for rank in range(missing * nproc, (missing + 1) * nproc):
            host = min(placed, key=lambda n: (len(placed[n]), n == 0, -n))
            placed[host].append(rank)
    return {node: tuple(sorted(ranks)) for node, ranks in placed.items()}


class Breakable(Protocol):
    def break_group(self, why: str, planned: bool = False) -> None: ...

    def group_running(self) -> bool: ...


@dataclass
class Member:
    node_rank: int
    nproc: int
    host: str
    pid: int
    writer: asyncio.StreamWriter
    heard: float = field(default_factory=time.monotonic)
    generation: int = 0  # the generation its ranks belong to; 0: none
    acks: set[int] = field(default_factory=set)  # generations it confirmed stopped

    def send(self, msg: wire.Message) -> None:
        try:
            self.writer.write(wire.frame(msg))
        except (OSError, RuntimeError):
            pass  # its reader sees the connection end and drops it


class Coordinator:
    def __init__(
        self, *, nnodes: int, nproc: int, master_addr: str, port: int, secret: str, detect_timeout_s: float,
        min_nodes: int, retry_timeout_s: float, join_timeout_s: float, tp_weights: tuple[float, ...] | None,
        form_template: wire.Form, events: EventLog | None = None, heartbeat_s: float | None = None,
        reshard: bool = False,
    ) -> None:  # fmt: skip
        self.nnodes, self.nproc = nnodes, nproc
        self.master_addr, self.port, self.secret = master_addr, port, secret
        self.detect_timeout_s = detect_timeout_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(1.0, detect_timeout_s / 4)
        self.min_nodes = max(1, min(min_nodes, nnodes))
        self.retry_timeout_s, self.join_timeout_s = retry_timeout_s, join_timeout_s
        self.tp_weights = tp_weights
        self.reshard = reshard
        self.world_size = self.configured_world_size
        self.template = form_template
        self.events = events if events is not None else EventLog()
        self.members: dict[int, Member] = {}
        self._seen: set[int] = set()  # nodes that were members once (one back has rejoined)
        self.generation = 0
        self.current: dict[int, int] = {}  # node_rank -> its place in the running generation
        self.engine: Breakable | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._forming = asyncio.Lock()
        self._closing = False
        self.files = FileServer()  # the files of loaded models, for ranks of nodes without them
        self._readers: set[asyncio.StreamWriter] = set()  # connections of ranks reading them

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, host=self.master_addr, port=self.port)
        except OSError as e:
            if e.errno != 99:  # EADDRNOTAVAIL: the address is not one of this host's (a NAT, a service name)
                raise EngineUnavailable(f"cannot listen on {self.master_addr}:{self.port}: {e}") from None
            log.warning("%s is not an address of this host; the rendezvous port listens on all", self.master_addr)
            self._server = await asyncio.start_server(self._accept, port=self.port)
        self._spawn(self._watch())

    def say_bye(self) -> None:
        """Tell every agent the cluster is shutting down (they let their ranks finish, then exit).
        Awaits nothing: safe from a task being cancelled (the server's Ctrl-C)."""
        if self._closing:
            return
        self._closing = True
        for member in list(self.members.values()):
            member.send(wire.Bye())

    async def close(self) -> None:
        self.say_bye()
        for member in list(self.members.values()):
            try:
                await asyncio.wait_for(member.writer.drain(), 2.0)
            except (OSError, TimeoutError, RuntimeError):
                pass
            member.writer.close()
        for writer in list(self._readers):
            writer.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def configured_world_size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def nodes_up(self) -> int:
        return 1 + len(self.members)

    # --- forming a generation ---------------------------------------------------------------------

    async def form(self) -> Formation:
        async with self._forming:
            self.generation += 1
            gen, first = self.generation, self.generation == 1
            await self._fence(gen - 1)
            wait_s = self.join_timeout_s if first else self.retry_timeout_s
            deadline = time.monotonic() + wait_s
            while True:
                up = 1 + len(self.members)
                if up >= self.nnodes or (not first and up >= self.min_nodes):
                    break
                if time.monotonic() > deadline:
                    if up >= self.min_nodes:
                        break
                    raise EngineUnavailable(
                        f"the cluster has {up} of {self.nnodes} nodes, fewer than cluster.min_nodes = "
                        f"{self.min_nodes}, after {wait_s:g} s"
                    )
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.05, deadline - time.monotonic()))
                except TimeoutError:
                    pass
            members = sorted(self.members.values(), key=lambda m: m.node_rank)
            nnodes = 1 + len(members)
            port = self._free_port()
            placement = place_ranks([0, *(m.node_rank for m in members)], self.nnodes, self.nproc, self.reshard)
            world = sum(len(r) for r in placement.values())
            weights = self._weights(placement)
            pp = self._stages(world, nnodes)
            self.current = {m.node_rank: place for place, m in enumerate(members, 1)}
            self.world_size = world
            for place, m in enumerate(members, 1):
                m.generation = gen
                m.send(self._form(gen, nnodes, place, port, weights, placement[m.node_rank], world, pp))
            self.events.add(
                "formed", f"generation {gen}: {nnodes} of {self.nnodes} nodes, world size {world}",
                generation=gen, nodes=[0, *self.current], world_size=world,
                ranks={str(n): list(r) for n, r in placement.items()},
            )  # fmt: skip
            log.info("generation %d: %d of %d nodes, world size %d, ranks by node %s", gen, nnodes, self.nnodes, world,
                     placement)  # fmt: skip
            return Formation(gen, nnodes, port, weights, world, placement[0], pp)

    def _form(
        self, gen: int, nnodes: int, place: int, port: int, weights: str | None, ranks: tuple[int, ...], world: int,
        pp: int,
    ) -> wire.Form:  # fmt: skip
        t = self.template
        return wire.Form(
            generation=gen, nnodes=nnodes, node_rank=place, master_addr=self.master_addr, master_port=port,
            ranks=ranks, world_size=world, comm=t.comm, device=t.device, tp_weights=weights,
            join_timeout_s=t.join_timeout_s, max_running=t.max_running, kv_cache_bytes=t.kv_cache_bytes,
            prefix_cache=t.prefix_cache, min_replicas=t.min_replicas, pp=pp, pp_weights=t.pp_weights,
            strategy=t.strategy, memory_budget=t.memory_budget,
        )  # fmt: skip

    def _stages(self, world: int, nnodes: int) -> int:
        """Pipeline stages of a group of `world` ranks on `nnodes` nodes: as configured while every rank
        is kept; a re-sharded smaller group makes each of its ranks a stage when every rank was one,
        and each of its nodes when every node was one (hybrid); else as many stages as still divide it."""
        pp = self.template.pp
        if pp <= 1 or world == self.configured_world_size:
            return pp
        if pp == self.configured_world_size:
            return world
        if pp == self.nnodes and world % nnodes == 0:
            return nnodes
        return max(d for d in range(1, min(pp, world) + 1) if world % d == 0)

    async def _fence(self, gen: int) -> None:
        """Every member's ranks of generation `gen` or older are gone (or the member is dropped)."""
        running = [m for m in self.members.values() if m.generation]
        if not running:
            return
        for m in running:
            m.send(wire.Stop(gen))
        deadline = time.monotonic() + STOP_ACK_S
        while time.monotonic() < deadline:
            if all(gen in m.acks or m.node_rank not in self.members for m in running):
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pass
        for m in running:
            if m.node_rank in self.members and gen not in m.acks:
                self._drop(m, f"its ranks were not confirmed stopped within {STOP_ACK_S:g} s")
            m.generation = 0

    def _free_port(self) -> int:
        try:
            return free_port(self.master_addr)
        except OSError:  # not an address of this host (see start): the store listens on all
            return free_port("")

    def _weights(self, placement: dict[int, tuple[int, ...]]) -> str | None:
        """--tp-weights of the group's ranks: every configured rank's when the ranks keep their
        places, else those of the nodes in the group, in their new order."""
        w = self.tp_weights
        if not w:
            return None
        if not self.reshard:
            return ",".join(f"{x:g}" for x in w)
        picked = [x for node in sorted(placement) for x in w[node * self.nproc : (node + 1) * self.nproc]]
        return ",".join(f"{x:g}" for x in picked)

    # --- the agents -------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        member = None
        try:
            challenge = wire.new_nonce()
            writer.write(wire.frame(wire.Challenge(challenge)))
            await writer.drain()
            hello = await asyncio.wait_for(wire.read_message(reader), 10.0)
            if isinstance(hello, wire.Reader):
                if await self._welcome_reader(hello, challenge, writer, peer):
                    self._readers.add(writer)
                    try:
                        await self.files.serve(hello.node_rank, reader, writer)
                    finally:
                        self._readers.discard(writer)
                return
            if not isinstance(hello, wire.Hello):
                log.warning("dropped a rendezvous connection from %s: it did not say hello", peer)
                return
            member = await asyncio.wait_for(self._handshake(hello, challenge, writer, peer), 10.0)
            if member is None:
                return
            await self._follow(member, reader)
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            log.warning("rendezvous connection from %s failed: %s", peer, e)
        except asyncio.CancelledError:
            pass  # the server is stopping: this connection ends with it
        finally:
            if member is not None and self.members.get(member.node_rank) is member:
                self._drop(member, "its connection closed")
            writer.close()

    async def _welcome_reader(
        self, hello: wire.Reader, challenge: str, writer: asyncio.StreamWriter, peer: Any
    ) -> bool:
        """A rank that reads model files: welcomed when it proves the secret."""
        expected = wire.reader_mac(self.secret, challenge, hello.node_rank, hello.nonce)
        if not wire.proves(self.secret, expected, hello.mac):
            log.warning("refused a file reader from %s: wrong cluster secret", peer)
            writer.write(wire.frame(wire.Refused(f"{wire.WRONG_SECRET} ({wire.SECRET_ENV} or cluster.secret)")))
            await writer.drain()
            return False
        proof = wire.welcome_mac(self.secret, hello.nonce)
        writer.write(wire.frame(wire.Welcome(self.heartbeat_s, self.detect_timeout_s, proof)))
        await writer.drain()
        return True

    async def _handshake(
        self, hello: wire.Hello, challenge: str, writer: asyncio.StreamWriter, peer: Any
    ) -> Member | None:
        h = hello
        expected = wire.hello_mac(self.secret, challenge, h.node_rank, h.nproc, h.host, h.pid, h.nonce)
        refusal = None
        if not wire.proves(self.secret, expected, hello.mac):
            refusal = f"{wire.WRONG_SECRET} ({wire.SECRET_ENV} or cluster.secret)"
            log.warning("refused a node from %s: wrong cluster secret", peer)
        elif self._closing:
            refusal = "again: node 0 is shutting down"
        elif not 0 < hello.node_rank < self.nnodes:
            refusal = f"--node-rank {h.node_rank} is not a worker node of this cluster: expected 1..{self.nnodes - 1}"
        elif h.nproc != self.nproc:
            refusal = f"--nproc-per-node {h.nproc} differs from node 0's {self.nproc}: every node runs as many ranks"
        elif hello.node_rank in self.members:
            refusal = f"again: node {h.node_rank} is already connected (host {self.members[h.node_rank].host})"
        if refusal is not None:
            writer.write(wire.frame(wire.Refused(refusal)))
            await writer.drain()
            return None
        proof = wire.welcome_mac(self.secret, hello.nonce)
        writer.write(wire.frame(wire.Welcome(self.heartbeat_s, self.detect_timeout_s, proof)))
        await writer.drain()
        member = Member(hello.node_rank, hello.nproc, hello.host, hello.pid, writer)
        rejoin = member.node_rank in self._seen
        self._seen.add(member.node_rank)
        self.members[member.node_rank] = member
        self.events.add("rejoined" if rejoin else "joined", f"node {member.node_rank} ({member.host})",
                        node=member.node_rank, host=member.host)  # fmt: skip
        log.info("node %d (%s) %s", member.node_rank, member.host, "rejoined" if rejoin else "joined")
        self._changed.set()
        return member

    async def _follow(self, member: Member, reader: asyncio.StreamReader) -> None:
        while True:
            msg = await wire.read_message(reader)
            if msg is None:
                return
            member.heard = time.monotonic()
            if isinstance(msg, wire.Stopped):
                member.acks.add(msg.generation)
                self._changed.set()
            elif isinstance(msg, wire.Exited | wire.Hung):
                why = f"exited with status {msg.code}" if isinstance(msg, wire.Exited) else msg.why
                if msg.generation == self.generation and member.node_rank in self.current:
                    self._break(f"node {member.node_rank}'s ranks {why}")

    def _drop(self, member: Member, why: str) -> None:
        if self.members.get(member.node_rank) is not member:
            return
        del self.members[member.node_rank]
        member.writer.close()
        self._changed.set()
        if self._closing:
            return
        self.events.add("left", f"node {member.node_rank} ({member.host}): {why}", node=member.node_rank)
        log.warning("node %d (%s) left: %s", member.node_rank, member.host, why)
        if member.node_rank in self.current and member.generation == self.generation:
            self._break(f"node {member.node_rank} left: {why}")

    def _break(self, why: str, planned: bool = False) -> None:
        if self._closing or self.engine is None:
            return
        self.current = {}
        self.engine.break_group(why, planned)

    async def _watch(self) -> None:
        """Heartbeats both ways, silent members dropped, and a smaller group grown when a node is back."""
        sent = 0.0
        while True:
            await asyncio.sleep(WATCH_S)
            now = time.monotonic()
            if now - sent >= self.heartbeat_s:
                sent = now
                for m in list(self.members.values()):
                    m.send(wire.Beat())
            for m in list(self.members.values()):
                if now - m.heard > self.detect_timeout_s:
                    self._drop(m, f"no heartbeat for {now - m.heard:.1f} s")
            waiting = [r for r in self.members if r not in self.current]
            engine = self.engine
            if waiting and engine is not None and engine.group_running() and not self._forming.locked():
                nodes = ", ".join(map(str, waiting))
                self._break(f"node(s) {nodes} joined: the group grows to {1 + len(self.members)} nodes", planned=True)
