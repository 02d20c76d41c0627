"""A worker node's agent against node 0's real coordinator (in a thread of the test, on a loopback
port): joining, being refused, node 0 gone. Forming real groups is the acceptance tests' part
(tests/server/test_cluster_faults.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.waits import wait_until
from tp_ollama.errors import TpOllamaError
from tp_ollama.launch import Cluster, free_port
from tp_ollama.membership import wire
from tp_ollama.membership.agent import Fatal, NodeAgent
from tp_ollama.membership.coordinator import Coordinator

SECRET = "agent-test-secret"


class Node0:
    """A coordinator served by an event loop in a thread."""

    def __init__(self, port: int, nnodes: int = 2) -> None:
        template = wire.Form(generation=0, nnodes=nnodes, node_rank=0, master_addr="127.0.0.1", master_port=0)
        self.c = Coordinator(
            nnodes=nnodes, nproc=1, master_addr="127.0.0.1", port=port, secret=SECRET, detect_timeout_s=2.0,
            min_nodes=1, retry_timeout_s=5.0, join_timeout_s=10.0, tp_weights=None, form_template=template,
            heartbeat_s=0.2,
        )  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.c.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.c.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def node0() -> Iterator[Node0]:
    n = Node0(free_port())
    yield n
    n.close()


def agent(port: int, secret: str, join_timeout_s: float = 10.0) -> NodeAgent:
    return NodeAgent(Cluster(2, 1, 1, "127.0.0.1", port, join_timeout_s), secret)


def test_an_agent_joins_beats_and_leaves_when_node_0_says_bye(node0):
    a = agent(node0.c.port, SECRET)
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(a.run() or "returned"), daemon=True)
    t.start()
    wait_until(lambda: 1 in node0.c.members, what="the agent a member")
    assert (a.heartbeat_s, a.detect_timeout_s) == (0.2, 2.0)  # node 0's timing, from its welcome
    first = node0.c.members[1].heard
    wait_until(lambda: node0.c.members[1].heard > first, what="a heartbeat from the agent")
    asyncio.run_coroutine_threadsafe(node0.c.close(), node0.loop).result(10)
    t.join(20)
    assert done == ["returned"]


def test_a_wrong_secret_ends_the_agent_with_the_reason(node0):
    with pytest.raises(Fatal, match="node 0 refused this node: the cluster secret does not match"):
        agent(node0.c.port, "not-the-secret").run()
    assert node0.c.members == {}


def test_an_agent_without_a_secret_says_where_to_find_it(node0, tmp_path, monkeypatch):
    monkeypatch.setenv("TP_OLLAMA_CACHE", str(tmp_path))  # no secret file there
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    with pytest.raises(TpOllamaError, match=f"set {wire.SECRET_ENV} to node 0's") as e:
        agent(node0.c.port, "", join_timeout_s=1.0).run()
    assert "did not take this node within 1 s" in str(e.value)


def test_an_agent_without_a_secret_takes_node_0s_file_when_it_appears(node0, tmp_path, monkeypatch):
    """Several nodes on one machine: node 0 writes the secret a moment after the others start."""
    monkeypatch.setenv("TP_OLLAMA_CACHE", str(tmp_path))
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    a = agent(node0.c.port, "")
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    wire.secret_file().write_text(SECRET + "\n")
    wait_until(lambda: 1 in node0.c.members, what="the agent a member once the file is there")
    asyncio.run_coroutine_threadsafe(node0.c.close(), node0.loop).result(10)
    t.join(20)
    assert not t.is_alive()


def test_node_0_unreachable_is_an_error_after_the_join_timeout():
    with pytest.raises(TpOllamaError, match=r"node 0 at 127.0.0.1:\d+ did not take this node within 0.5 s"):
        agent(free_port(), SECRET, join_timeout_s=0.5).run()
