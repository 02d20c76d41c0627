"""Node 0's coordinator on a real loopback port, with agents that speak the wire protocol from the
test (doubles of tp_ollama.membership.agent, which starts real engine processes) and a double of the
EngineClient that records what the coordinator asks of it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from tests.waits import wait_until_async
from tp_ollama.errors import EngineUnavailable
from tp_ollama.launch import free_port
from tp_ollama.membership import wire
from tp_ollama.membership.coordinator import Coordinator, place_ranks

SECRET = "test-secret"


def in_loop(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in an event loop of its own."""

    async def body(*args: Any, **kwargs: Any) -> None:
        try:
            await asyncio.wait_for(fn(*args, **kwargs), 60)
        finally:
            for agent in OPEN:
                agent.writer.close()
            OPEN.clear()
            await asyncio.sleep(0)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(body(*args, **kwargs))

    return run


def test_kept_ranks_move_to_the_nodes_up_with_the_fewest():
    assert place_ranks([0, 1, 2], 3, 1, reshard=False) == {0: (0,), 1: (1,), 2: (2,)}
    assert place_ranks([0, 2], 3, 1, reshard=False) == {0: (0,), 2: (1, 2)}  # node 0 (the front end) last
    assert place_ranks([0], 3, 1, reshard=False) == {0: (0, 1, 2)}
    # Ties go to the last node first.
    assert place_ranks([0, 1, 3], 4, 2, reshard=False) == {0: (0, 1), 1: (2, 3, 5), 3: (4, 6, 7)}


def test_resharded_ranks_are_renumbered_in_node_order():
    assert place_ranks([0, 2], 3, 1, reshard=True) == {0: (0,), 2: (1,)}
    assert place_ranks([0, 2, 3], 4, 2, reshard=True) == {0: (0, 1), 2: (2, 3), 3: (4, 5)}


class FakeEngine:
    """Stands in for the EngineClient: a group that is running until the coordinator breaks it."""

    def __init__(self) -> None:
        self.running = False
        self.breaks: list[tuple[str, bool]] = []

    def break_group(self, why: str, planned: bool = False) -> None:
        self.breaks.append((why, planned))
        self.running = False

    def group_running(self) -> bool:
        return self.running


OPEN: list[Agent] = []  # closed at the end of each test


class Agent:
    """A node's side of the channel, driven by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def join(cls, port: int, node_rank: int, secret: str = SECRET, nproc: int = 1) -> tuple[Agent, wire.Message]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        agent = cls(reader, writer)
        OPEN.append(agent)
        challenge = await agent.read()
        assert isinstance(challenge, wire.Challenge)
        nonce = wire.new_nonce()
        proof = wire.hello_mac(secret, challenge.nonce, node_rank, nproc, "h", os.getpid(), nonce)
        agent.send(wire.Hello(node_rank, nproc, "h", os.getpid(), nonce, proof))
        answer = await agent.read()
        if isinstance(answer, wire.Welcome):
            assert answer.mac == wire.welcome_mac(secret, nonce)  # node 0 proved the secret back
        return agent, answer

    def send(self, msg: wire.Message) -> None:
        self.writer.write(wire.frame(msg))

    async def read(self, skip_beats: bool = True) -> wire.Message:
        while True:
            msg = await asyncio.wait_for(wire.read_message(self.reader), 10)
            if msg is None:
                raise ConnectionError("node 0 closed the connection")
            if not (skip_beats and isinstance(msg, wire.Beat)):
                return msg

    async def answer_stops(self) -> None:
        """Acknowledge every Stop, beat back, until the connection ends."""
        try:
            while True:
                msg = await self.read(skip_beats=False)
                if isinstance(msg, wire.Stop):
                    self.send(wire.Stopped(msg.generation))
                elif isinstance(msg, wire.Beat):
                    self.send(wire.Beat())
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass


@contextlib.asynccontextmanager
async def running(port: int, **kw: Any) -> AsyncIterator[tuple[Coordinator, FakeEngine]]:
    """A started coordinator (see `coordinator`) with a FakeEngine attached, closed on the way out."""
    c = coordinator(port, **kw)
    c.engine = engine = FakeEngine()
    await c.start()
    try:
        yield c, engine
    finally:
        await c.close()


def coordinator(port: int, nnodes: int = 3, **kw: object) -> Coordinator:
    template = wire.Form(generation=0, nnodes=nnodes, node_rank=0, master_addr="127.0.0.1", master_port=0)
    args: dict = dict(nnodes=nnodes, nproc=1, master_addr="127.0.0.1", port=port, secret=SECRET,
                      detect_timeout_s=2.0, min_nodes=1, retry_timeout_s=5.0, join_timeout_s=10.0, tp_weights=None,
                      form_template=template, heartbeat_s=0.2)  # fmt: skip
    args.update(kw)
    return Coordinator(**args)


@in_loop
async def test_the_first_group_waits_for_every_node_and_tells_each_its_ranks():
    port = free_port()
    async with running(port, tp_weights=(2.0, 1.0, 1.0)) as (c, engine):
        forming = asyncio.create_task(c.form())
        a2, welcome = await Agent.join(port, 2)
        assert isinstance(welcome, wire.Welcome) and welcome.detect_timeout_s == 2.0
        await asyncio.sleep(0.3)
        assert not forming.done()  # node 1 is still missing
        a1, _ = await Agent.join(port, 1)
        formation = await asyncio.wait_for(forming, 10)
        assert (formation.generation, formation.nnodes, formation.world_size, formation.ranks) == (1, 3, 3, (0,))
        f1, f2 = await a1.read(), await a2.read()
        assert isinstance(f1, wire.Form) and isinstance(f2, wire.Form)
        assert (f1.node_rank, f1.ranks, f1.world_size, f1.master_port) == (1, (1,), 3, formation.master_port)
        assert (f2.node_rank, f2.ranks, f2.tp_weights) == (2, (2,), "2,1,1")
        assert [e["kind"] for e in c.events.events] == ["joined", "joined", "formed"]
        assert engine.breaks == []


@in_loop
async def test_a_node_that_leaves_breaks_the_group_and_the_next_one_keeps_its_ranks():
    port = free_port()
    async with running(port) as (c, engine):
        forming = asyncio.create_task(c.form())
        (a1, _), (a2, _) = await Agent.join(port, 1), await Agent.join(port, 2)
        await asyncio.wait_for(forming, 10)
        await a1.read(), await a2.read()
        engine.running = True
        acks = asyncio.create_task(a1.answer_stops())
        a2.writer.close()  # node 2 dies: its connection closes
        await wait_until_async(lambda: engine.breaks, 10, what="the group broken")
        assert engine.breaks == [("node 2 left: its connection closed", False)]
        formation = await asyncio.wait_for(c.form(), 10)  # fences node 1's ranks, then forms
        assert (formation.generation, formation.nnodes, formation.world_size) == (2, 2, 3)
        assert c.nodes_up == 2
        kinds = [e["kind"] for e in c.events.events]
        assert kinds[-2:] == ["left", "formed"]
        acks.cancel()


@in_loop
async def test_a_silent_node_is_dropped_after_the_detect_timeout():
    port = free_port()
    async with running(port, nnodes=2, detect_timeout_s=1.0) as (c, engine):
        forming = asyncio.create_task(c.form())
        agent, _ = await Agent.join(port, 1)
        await asyncio.wait_for(forming, 10)
        engine.running = True
        # The agent reads nothing and says nothing: a hung node, or a cut link.
        await wait_until_async(lambda: engine.breaks, 10, what="the silent node dropped")
        why, planned = engine.breaks[0]
        assert why.startswith("node 1 left: no heartbeat for") and not planned
        assert c.nodes_up == 1
        agent.writer.close()


@in_loop
async def test_a_node_back_grows_a_smaller_group_planned():
    port = free_port()
    async with running(port, nnodes=2) as (c, engine):
        forming = asyncio.create_task(c.form())
        agent, _ = await Agent.join(port, 1)
        await asyncio.wait_for(forming, 10)
        engine.running = True
        agent.writer.close()
        await wait_until_async(lambda: engine.breaks, 10, what="the group broken")
        formation = await asyncio.wait_for(c.form(), 10)
        assert formation.nnodes == 1 and formation.ranks == (0, 1)  # node 0 alone keeps every rank
        engine.running = True
        back, _ = await Agent.join(port, 1)
        beats = asyncio.create_task(back.answer_stops())
        await wait_until_async(lambda: len(engine.breaks) == 2, 10, what="the group stopped to grow")
        assert engine.breaks[1][1] is True and "joined" in engine.breaks[1][0]
        assert [e["kind"] for e in c.events.events].count("rejoined") == 1
        formation = await asyncio.wait_for(c.form(), 10)
        assert (formation.nnodes, formation.ranks) == (2, (0,))
        beats.cancel()


@pytest.mark.parametrize(
    ("node_rank", "secret", "nproc", "why"),
    [
        (1, "wrong", 1, "the cluster secret does not match"),
        (0, SECRET, 1, "--node-rank 0 is not a worker node of this cluster: expected 1..2"),
        (3, SECRET, 1, "--node-rank 3 is not a worker node of this cluster: expected 1..2"),
        (1, SECRET, 2, "--nproc-per-node 2 differs from node 0's 1"),
    ],
)
@in_loop
async def test_a_node_that_does_not_belong_is_refused_and_changes_nothing(node_rank, secret, nproc, why):
    port = free_port()
    async with running(port) as (c, _):
        _, answer = await Agent.join(port, node_rank, secret=secret, nproc=nproc)
        assert isinstance(answer, wire.Refused) and answer.why.startswith(why), answer
        assert c.members == {} and c.events.events == type(c.events.events)()


@in_loop
async def test_a_second_node_with_a_taken_rank_is_told_to_try_again():
    port = free_port()
    async with running(port):
        first, _ = await Agent.join(port, 1)
        _, answer = await Agent.join(port, 1)
        assert isinstance(answer, wire.Refused) and answer.why.startswith("again: node 1 is already connected")
        first.writer.close()


@in_loop
async def test_too_few_nodes_after_the_wait_is_a_clear_error():
    port = free_port()
    async with running(port, nnodes=3, min_nodes=2, join_timeout_s=0.5) as (c, _):
        with pytest.raises(EngineUnavailable, match=r"1 of 3 nodes, fewer than cluster.min_nodes = 2, after 0.5 s"):
            await c.form()


@in_loop
async def test_close_says_bye_to_every_node():
    port = free_port()
    c = coordinator(port, nnodes=2)
    await c.start()
    agent, _ = await Agent.join(port, 1)
    await c.close()
    assert await agent.read() == wire.Bye()


def test_a_smaller_group_keeps_a_stage_per_rank_or_per_node_or_what_divides_it():
    """Pipeline stages after a re-shard: a stage per rank stays one per rank, a stage per node (hybrid)
    one per node, other counts the most that still divide the ranks left."""

    def stages(nnodes: int, nproc: int, pp: int, world: int, up: int) -> int:
        template = wire.Form(generation=0, nnodes=nnodes, node_rank=0, master_addr="127.0.0.1", master_port=0, pp=pp)
        c = coordinator(0, nnodes=nnodes, nproc=nproc, form_template=template)
        return c._stages(world, up)

    assert stages(3, 1, 3, 3, 3) == 3  # every rank kept: as configured
    assert stages(3, 1, 3, 2, 2) == 2  # a stage per rank
    assert stages(3, 2, 3, 4, 2) == 2  # a stage per node, TP 2 inside: 2 nodes left
    assert stages(2, 4, 4, 6, 2) == 3  # 4 stages over 8 ranks, 6 left: 3 stages of 2
    assert stages(2, 2, 1, 2, 1) == 1  # tensor parallel stays so
