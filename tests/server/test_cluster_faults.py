"""Three `tp-ollama launch` nodes on this machine (loopback), as a user starts them, with the defaults,
serving smollm2:135m over the Ollama API of node 0 while nodes fail:

- a whole node killed (agent and ranks) during three greedy streams: all three finish with the text
  of the fault-free run, and the cluster goes on degraded (the lost node's rank on a survivor);
- the node started again with its original command: the group grows back to three nodes;
- a rank stopped (SIGSTOP) mid-stream: detected, fenced out (killed), the stream finishes the same;
- a whole node stopped (agent and ranks silent, as behind a cut link): dropped after the detect
  timeout, the stream finishes, and the node comes back by itself once continued;
- a node with the wrong secret: refused, the group unaffected;
- Ctrl-C on node 0: every node exits cleanly and no process is left.

The tests run in order on one cluster (each starts from a healthy three-node group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ollama
import psutil
import pytest

from tests.waits import wait_until
from tp_ollama.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster-faults")]

MODEL = "smollm2:135m"
SECRET = "cluster-faults-secret"
PROMPTS = ["Tell me a long story about a dragon.", "Describe the water cycle in detail.", "Write a poem about the sea."]
OPTIONS = {"temperature": 0, "num_predict": 40}
STARTUP_S = 180
HEAL_S = 60  # a lost node back, or a failure recovered from, within this long


@dataclass
class Cluster:
    port: int
    url: str
    env: dict[str, str]
    logs: Path
    nodes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    reference: dict[str, str] = field(default_factory=dict)

    def command(self, rank: int) -> list[str]:
        cmd = [sys.executable, "-m", "tp_ollama", "launch", "--nnodes", "3", "--node-rank", str(rank),
               "--master-port", str(self.port)]  # fmt: skip
        return cmd + (["--port", str(self.http_port)] if rank == 0 else [])

    @property
    def http_port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self, rank: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"node{rank}.log").open("a")
        proc = subprocess.Popen(self.command(rank), env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        log.close()
        self.nodes[rank] = proc
        return proc

    def status(self) -> dict:
        return httpx.get(f"{self.url}/api/distributed/status", timeout=30).json()

    def events(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/distributed/events", timeout=30).json()["events"]

    def healthy(self) -> bool:
        s = self.status()
        return s["state"] == "healthy" and s["membership"]["replicas"][0]["nodes"] == 3

    def tree(self, rank: int) -> list[psutil.Process]:
        root = psutil.Process(self.nodes[rank].pid)
        return [root, *root.children(recursive=True)]

    def ranks(self, rank: int) -> list[psutil.Process]:
        """The engine ranks a node runs now: the children of its running group's host."""
        hosts = [p for p in psutil.Process(self.nodes[rank].pid).children() if p.children()]
        assert len(hosts) == 1, hosts
        return hosts[0].children()


def stream(url: str, prompt: str, on_token=None) -> tuple[str, float, int]:
    """A greedy stream: its text, the longest gap between two tokens, and its eval_count."""
    with ollama.Client(host=url, timeout=300) as client:
        pieces, last, gap, final = [], None, 0.0, None
        for chunk in client.generate(model=MODEL, prompt=prompt, options=OPTIONS, stream=True):
            now = time.monotonic()
            if last is not None:
                gap = max(gap, now - last)
            last = now
            pieces.append(chunk.response)
            if on_token is not None:
                on_token(len(pieces))
            final = chunk
    assert final is not None and final.done
    return "".join(pieces), gap, int(final.eval_count or 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OLLAMA_MODELS": str(tmp_path_factory.mktemp("models")),
           "TP_OLLAMA_CLUSTER_SECRET": SECRET}  # fmt: skip
    env.pop("OLLAMA_HOST", None)
    c = Cluster(free_port(), f"http://127.0.0.1:{free_port()}", env, logs)
    for rank in (1, 2, 0):
        c.start(rank)
    everything: list[psutil.Process] = []
    try:
        wait_until(lambda: _answers(c), STARTUP_S, what="node 0 serving")
        wait_until(c.healthy, STARTUP_S, what="the three nodes in one group")
        with ThreadPoolExecutor(3) as pool:
            for prompt, (text, _, count) in zip(PROMPTS, pool.map(lambda p: stream(c.url, p), PROMPTS), strict=True):
                assert count == OPTIONS["num_predict"], "a reference stream ended early: pick a longer prompt"
                c.reference[prompt] = text
        yield c
    finally:
        for proc in c.nodes.values():
            try:
                everything += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in c.nodes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for p in everything:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in c.nodes.values():
            proc.wait(timeout=30)


def _answers(c: Cluster) -> bool:
    try:
        httpx.get(c.url, timeout=1)
        return True
    except httpx.TransportError:
        assert c.nodes[0].poll() is None, (c.logs / "node0.log").read_text()[-3000:]
        return False


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


def test_three_streams_finish_the_same_when_a_whole_node_is_killed(cluster):
    before = len(cluster.events())
    victims = cluster.tree(2)
    killed: list[float] = []

    def kill_node_2(n: int) -> None:
        if n == 10 and not killed:
            os.killpg(cluster.nodes[2].pid, signal.SIGKILL)  # the agent; its hosts and ranks die with it
            killed.append(time.monotonic())

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(stream, cluster.url, PROMPTS[0], kill_node_2)
        others = [pool.submit(stream, cluster.url, p) for p in PROMPTS[1:]]
        results = [first.result(), *(f.result() for f in others)]
    for prompt, (text, _, count) in zip(PROMPTS, results, strict=True):
        assert text == cluster.reference[prompt]
        assert count == OPTIONS["num_predict"]
    print(f"longest gap between two tokens with a node killed: {max(g for _, g, _ in results):.2f} s")
    _, alive = psutil.wait_procs(victims, timeout=30)
    assert alive == [], "a process of the killed node is still running"
    cluster.nodes[2].wait(timeout=10)
    status = cluster.status()
    assert status["state"] == "degraded" and status["world_size"] == 3
    assert status["membership"]["replicas"][0]["nodes"] == 2
    new = kinds(cluster.events()[before:])
    for kind in ("left", "detected", "formed", "replayed", "recovered"):
        assert kind in new, new


def test_the_killed_node_started_again_rejoins_and_serves_the_same_text(cluster):
    before = len(cluster.events())
    cluster.start(2)
    wait_until(cluster.healthy, HEAL_S, what="the group back at three nodes")
    assert "rejoined" in kinds(cluster.events()[before:])
    text, _, _ = stream(cluster.url, PROMPTS[1])
    assert text == cluster.reference[PROMPTS[1]]
    assert len(cluster.ranks(2)) == 1  # node 2 runs its own rank again


def test_a_stopped_rank_is_fenced_out_and_the_stream_finishes_the_same(cluster):
    wait_until(cluster.healthy, HEAL_S, what="a healthy group")
    (rank,) = cluster.ranks(1)
    stopped: list[float] = []

    def stop_a_rank(n: int) -> None:
        if n == 10 and not stopped:
            rank.send_signal(signal.SIGSTOP)
            stopped.append(time.monotonic())

    text, gap, _ = stream(cluster.url, PROMPTS[2], stop_a_rank)
    assert text == cluster.reference[PROMPTS[2]]
    print(f"longest gap between two tokens with a rank stopped: {gap:.2f} s")
    assert gap < 5 + 5  # inference.fault_tolerance.detect_timeout, and the group formed again
    wait_until(lambda: not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE, what="the stopped rank killed")
    try:
        rank.send_signal(signal.SIGCONT)  # too late: it is gone, and the new group never knew it
    except psutil.NoSuchProcess:
        pass
    wait_until(cluster.healthy, HEAL_S, what="a healthy group")
    text, _, _ = stream(cluster.url, PROMPTS[0])
    assert text == cluster.reference[PROMPTS[0]]


def test_a_silent_node_is_dropped_and_comes_back_when_it_wakes(cluster):
    """SIGSTOP of a whole node (agent and ranks): nothing closes, nothing answers, as behind a cut link."""
    wait_until(cluster.healthy, HEAL_S, what="a healthy group")
    frozen, old_ranks = cluster.tree(1), cluster.ranks(1)
    stopped: list[float] = []

    def freeze_node_1(n: int) -> None:
        if n == 10 and not stopped:
            for p in frozen:
                p.send_signal(signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        text, gap, _ = stream(cluster.url, PROMPTS[0], freeze_node_1)
        assert text == cluster.reference[PROMPTS[0]]
        print(f"longest gap between two tokens with a node silent: {gap:.2f} s")
        assert cluster.status()["membership"]["replicas"][0]["nodes"] == 2
    finally:
        for p in frozen:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    # Awake, the agent finds node 0 gone from its connection, kills its old ranks and joins again.
    wait_until(cluster.healthy, HEAL_S, what="the woken node back in the group")
    _, alive = psutil.wait_procs(old_ranks, timeout=30)
    assert alive == [], "a rank of the old group outlived it"
    text, _, _ = stream(cluster.url, PROMPTS[2])
    assert text == cluster.reference[PROMPTS[2]]


def test_a_node_with_the_wrong_secret_is_refused_and_the_group_goes_on(cluster):
    wait_until(cluster.healthy, HEAL_S, what="a healthy group")
    generation = cluster.status()["membership"]["replicas"][0]["generation"]
    intruder = subprocess.run(
        cluster.command(1), env={**cluster.env, "TP_OLLAMA_CLUSTER_SECRET": "guess"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert intruder.returncode == 1
    assert "node 0 refused this node: the cluster secret does not match" in intruder.stderr
    status = cluster.status()
    assert status["state"] == "healthy" and status["membership"]["replicas"][0]["generation"] == generation
    text, _, _ = stream(cluster.url, PROMPTS[1])
    assert text == cluster.reference[PROMPTS[1]]


def test_ctrl_c_on_node_0_stops_every_node(cluster):
    everything = [p for rank in cluster.nodes for p in cluster.tree(rank)]
    cluster.nodes[0].send_signal(signal.SIGINT)
    assert cluster.nodes[0].wait(timeout=60) in (0, 130)
    for rank in (1, 2):
        assert cluster.nodes[rank].wait(timeout=60) == 0, (cluster.logs / f"node{rank}.log").read_text()[-3000:]
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert alive == []
