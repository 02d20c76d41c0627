"""tp_ollama.server.engine_client over a socket pair, the test playing engine rank 0 with its real link
(engine/link.py): replies reach the request they name while several share the socket, a consumer that leaves
cancels its request, each control command gets its one reply, and a connection that ends fails whoever waits
(the real engine loop behind it: tests/local_engine.py, used by the server tests)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.waits import HANG_S
from tp_ollama.engine.link import SocketLink
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.protocol import (
    Cancel,
    ClusterFacts,
    Command,
    DescribeCluster,
    Done,
    Embed,
    Embedded,
    Failed,
    FinalStats,
    Generate,
    Load,
    Loaded,
    LoadInfo,
    Token,
    Unload,
)
from tp_ollama.errors import EngineUnavailable, TpOllamaError
from tp_ollama.server.engine_api import LoadedModel, LoadRequest, TokenEvent
from tp_ollama.server.engine_client import EngineClient

Scenario = Callable[[EngineClient, SocketLink], Awaitable[Any]]


def run(scenario: Scenario) -> Any:
    """scenario(client, rank 0's link) on an event loop, the two ends of one socket pair."""
    front, back = socket.socketpair()
    link = SocketLink(conn=back)

    async def main() -> Any:
        client = EngineClient(sock=front)
        try:
            return await scenario(client, link)
        finally:
            await client.close()
            link.close()

    return asyncio.run(main())


async def received(link: SocketLink, n: int) -> list[Command]:
    """The next n commands the engine end gets."""
    commands: list[Command] = []
    while len(commands) < n:
        arrived = await asyncio.to_thread(link.poll, HANG_S)
        assert arrived, f"no command within {HANG_S:g} s"
        commands += arrived
    return commands


async def events(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in stream]


def test_replies_reach_the_request_they_name_while_two_share_the_socket():
    async def scenario(client: EngineClient, link: SocketLink) -> tuple[list[TokenEvent], ...]:
        first = asyncio.create_task(events(client.generate([1, 2], GenerationOptions(), frozenset({0}))))
        second = asyncio.create_task(events(client.generate([3], GenerationOptions(), frozenset())))
        generates = await received(link, 2)
        assert all(isinstance(g, Generate) for g in generates)
        ids = {tuple(g.prompt): g.id for g in generates if isinstance(g, Generate)}
        a, b = ids[(1, 2)], ids[(3,)]
        assert a != b
        for reply in (Token(b, 7), Token(a, 5), Done(a, FinalStats("stop", 2, 10, 1, 20)), Token(b, 8),
                      Done(b, FinalStats("length", 1, 5, 2, 30, comm_duration=4))):  # fmt: skip
            link.send(reply)
        done = await first, await second
        assert client.active == 0
        return done

    first, second = run(scenario)
    assert first == [
        TokenEvent(5),
        TokenEvent(None, True, "stop", prompt_eval_count=2, prompt_eval_duration=10, eval_count=1, eval_duration=20),
    ]
    assert [e.token for e in second] == [7, 8, None]
    assert (second[-1].done_reason, second[-1].eval_count, second[-1].comm_duration) == ("length", 2, 4)


def test_a_consumer_that_leaves_early_cancels_its_request():
    async def scenario(client: EngineClient, link: SocketLink) -> list[Command]:
        stream = client.generate([1], GenerationOptions(), frozenset())
        first = asyncio.create_task(anext(stream))
        (generate,) = await received(link, 1)
        link.send(Token(generate.id, 42))
        assert (await first).token == 42
        await stream.aclose()
        return [generate, *await received(link, 1)]

    generate, cancel = run(scenario)
    assert cancel == Cancel(generate.id)


def test_each_control_command_gets_its_one_reply():
    info = LoadInfo("/m.gguf", "bfloat16", 2048, "int8", 2, [{"rank": 0}, {"rank": 1}], 1000, {"dtype": "bfloat16"},
                    1.5, 64, 16)  # fmt: skip

    def answer(cmd: Command) -> Any:
        if isinstance(cmd, Load):
            return Loaded(cmd.id, info)
        if isinstance(cmd, Embed):
            return Embedded(cmd.id, [[float(len(x))] for x in cmd.inputs])
        if isinstance(cmd, DescribeCluster):
            return ClusterFacts(cmd.id, 2, [{"rank": 0}, {"rank": 1}], 12.5, {"blocks": 64}, running=1)
        assert isinstance(cmd, Unload)
        return Failed(cmd.id, "no model is loaded")

    async def engine(link: SocketLink, calls: int) -> None:
        for _ in range(calls):  # each call awaits its reply before the next is sent
            (cmd,) = await received(link, 1)
            link.send(answer(cmd))

    async def scenario(client: EngineClient, link: SocketLink) -> dict[str, Any]:
        serving = asyncio.create_task(engine(link, 4))
        loaded = await client.load(LoadRequest(Path("/m.gguf"), "bfloat16", 2048, "int8"))
        out: dict[str, Any] = {"loaded": loaded, "held": client.loaded()}
        out["embeddings"] = await client.embed([[1, 2, 3], [4]])
        out["cluster"] = await client.cluster()
        with pytest.raises(TpOllamaError, match="no model is loaded"):
            await client.unload()
        await serving
        return out

    out = run(scenario)
    assert (
        out["loaded"]
        == out["held"]
        == LoadedModel(
            Path("/m.gguf"), "bfloat16", 2048, 2, [{"rank": 0}, {"rank": 1}], 1000, "int8", {"dtype": "bfloat16"}
        )
    )
    assert out["embeddings"] == [[3.0], [1.0]]
    assert out["cluster"] == {"world_size": 2, "ranks": [{"rank": 0}, {"rank": 1}], "as_of": 12.5,
                              "kv_cache": {"blocks": 64}, "running": 1, "waiting": 0}  # fmt: skip


def test_a_connection_that_ends_fails_whoever_waits_and_what_comes_after():
    async def scenario(client: EngineClient, link: SocketLink) -> None:
        stream = asyncio.create_task(events(client.generate([1], GenerationOptions(), frozenset())))
        await received(link, 1)
        link.close()  # rank 0 went away
        with pytest.raises(EngineUnavailable, match=r"the engine closed its connection \(a rank may have died\)"):
            await stream
        assert client.loaded() is None
        with pytest.raises(EngineUnavailable, match="the in-process engine has stopped; restart the server"):
            await client.load(LoadRequest(Path("/m.gguf")))

    run(scenario)
