"""launch/netns-cluster.sh: K "hosts" in network namespaces on one machine, joined by a bridge in a namespace
of its own, with a shaped (tbf) and delayed (TP_OLLAMA_LINK_DELAY_US) link.

- 2 and 3 nodes write exactly the text of one process (greedy, a tiny random GGUF made here);
- --exec runs a command in every namespace with its rank, address and the link settings;
- a failing run, --timeout and an interruption end with the right status;
- serving, a cut link drops its node after the detect timeout, the stream goes on with the same text
  and the node rejoins once the link is back;
- after every run no namespace, interface or process of the run is left. Runs that need namespaces are
  skipped (with the reason) unless this is root with iproute2 and `ip netns add` works.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_launch_recipes import marked_processes
from tests.tiny import write_chat_gguf

# Network namespaces and the machine-wide lists of them: one such test at a time (pytest-xdist).
pytestmark = pytest.mark.xdist_group("netns")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "netns-cluster.sh"
PROMPT = "hello world, the quick"
GREEDY = ["--temperature", "0", "--num-predict", "6"]
RUN_TIMEOUT = 180.0  # seconds one run may take on a busy 2-core machine before the test fails
MARK = "TPO_NETNS_TEST_MARK"  # every process of a run inherits it from the script's environment


def netns_unavailable() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's {tool} (apt-get install -y iproute2)"
    probe = f"tpo-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=True)
    return None


@pytest.fixture(scope="module")
def netns() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class Tiny:
    path: Path
    text: str  # what one process generates for PROMPT


@pytest.fixture(scope="module")
def tiny(netns: None, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = write_chat_gguf(tmp_path_factory.mktemp("netns") / "tiny.gguf")
    done = subprocess.run(
        [sys.executable, "-m", "tp_ollama", "generate", str(path), PROMPT, *GREEDY],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, env=script_env("reference"),
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout, done.stderr
    return Tiny(path, done.stdout)


def script_env(mark: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARK: mark}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's tp-ollama
    env.pop("TP_OLLAMA_LINK_DELAY_US", None)
    return env


@dataclass(frozen=True)
class Run:
    pid: int
    mark: str
    rc: int
    out: str
    err: str


def start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [str(SCRIPT), *args], env=script_env(mark), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, mark


def finish(proc: subprocess.Popen[str], mark: str) -> Run:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap tears everything down
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"netns-cluster.sh ran past {RUN_TIMEOUT:g} s; stderr: {err[-3000:]}")
    return Run(proc.pid, mark, proc.returncode, out, err)


def run(args: list[str]) -> Run:
    return finish(*start(args))


def ip_names(*args: str) -> set[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
    if args[:2] == ("netns", "list"):
        return {line.split()[0] for line in out.splitlines() if line.strip()}
    # `ip -o link`: "3: tpo12b0@if2: <...> ..."
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def assert_nothing_left(done: Run) -> None:
    assert {n for n in ip_names("netns", "list") if n.startswith(f"tpo-{done.pid}-")} == set()
    assert {n for n in ip_names("-o", "link", "show") if n.startswith(f"tpo{done.pid}")} == set()
    assert marked_processes(MARK, done.mark) == []


# ---- generation across the emulated hosts -----------------------------------------------------------------


def test_two_nodes_over_a_shaped_delayed_link_write_the_one_process_text(tiny: Tiny) -> None:
    done = run(["--nodes", "2", "--rate", "1gbit", "--delay-us", "200", str(tiny.path), PROMPT, *GREEDY])
    assert done.rc == 0, done.err
    assert done.out == tiny.text
    assert_nothing_left(done)


def test_three_nodes_split_the_heads_unevenly_and_write_the_same_text(tiny: Tiny) -> None:
    done = run(["--nodes", "3", str(tiny.path), PROMPT, *GREEDY])  # 4 query heads over 3 ranks: 2/1/1
    assert done.rc == 0, done.err
    assert done.out == tiny.text
    assert_nothing_left(done)


def test_a_failing_run_shows_the_error_and_leaves_nothing(tiny: Tiny, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.gguf"
    done = run(["--nodes", "2", str(missing), PROMPT, *GREEDY])
    assert done.rc != 0
    assert str(missing) in done.err and "no such file" in done.err, done.err
    assert_nothing_left(done)


# ---- --exec, the topology, and the ways a run ends ---------------------------------------------------------

# Each node writes what it sees to DIR/node<rank>; node 0 then says "ready" and waits for DIR/go (120 s at
# most: only a test that hangs makes it wait that long), so that the test can look at the namespaces while
# they exist.
EXEC_SCRIPT = """
d=$0
delay=${TP_OLLAMA_LINK_DELAY_US:-none}
echo "$NODE_RANK $NNODES $NODE_ADDR $MASTER_ADDR $MASTER_PORT $(hostname) $delay" >"$d/tmp$NODE_RANK"
tc qdisc show dev "$NODE_IFNAME" >>"$d/tmp$NODE_RANK"
mv "$d/tmp$NODE_RANK" "$d/node$NODE_RANK"
if [ "$NODE_RANK" = 0 ]; then
    echo ready
    i=0
    while [ ! -e "$d/go" ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i + 1)); done
fi
"""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_exec_runs_in_every_namespace_behind_a_bridge_of_its_own(netns: None, tmp_path: Path) -> None:
    links_before = ip_names("-o", "link", "show")
    proc, mark = start(
        ["--nodes", "3", "--rate", "100mbit", "--delay-us", "150", "--port", "29600",
         "--exec", "sh", "-c", EXEC_SCRIPT, str(tmp_path)]
    )  # fmt: skip
    try:
        assert read_line(proc, 60) == "ready\n"
        pid = proc.pid
        assert {f"tpo-{pid}-br", f"tpo-{pid}-n0", f"tpo-{pid}-n1", f"tpo-{pid}-n2"} <= ip_names("netns", "list")
        # The bridge and its ports live in the bridge's namespace; the machine's own has no new interface.
        assert {n for n in ip_names("-o", "link", "show") - links_before if n.startswith("tpo")} == set()
        bridge = subprocess.run(
            ["ip", "-n", f"tpo-{pid}-br", "-o", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        for i in range(3):
            assert f"tpo{pid}b{i}@" in bridge and f"master tpo{pid}br" in bridge, bridge
        qdiscs = subprocess.run(
            ["tc", "-n", f"tpo-{pid}-br", "qdisc", "show"], capture_output=True, text=True, check=True
        ).stdout
        for i in range(3):  # the bridge's end of each veth shapes the traffic towards that node
            assert any(f"dev tpo{pid}b{i} " in q and "tbf" in q and "rate 100Mbit" in q for q in qdiscs.splitlines())
    finally:
        (tmp_path / "go").touch()  # node 0 ends, and the run with it, whether the checks passed or not
        done = finish(proc, mark)
    assert done.rc == 0, done.err
    for i in range(3):
        seen, qdisc = (tmp_path / f"node{i}").read_text().splitlines()[:2]
        assert seen == f"{i} 3 10.78.0.{i + 1} 10.78.0.1 29600 tpo-node{i} 150"
        assert "tbf" in qdisc and "rate 100Mbit" in qdisc  # the node's end shapes what it sends
    assert_nothing_left(done)


def test_timeout_stops_every_node(netns: None) -> None:
    t0 = time.monotonic()
    done = run(["--nodes", "2", "--timeout", "1", "--exec", "sleep", "60"])
    assert done.rc == 124, done.err
    assert time.monotonic() - t0 >= 1.0  # not before the limit
    assert "still running after --timeout 1 s" in done.err
    assert_nothing_left(done)


def test_an_interrupt_tears_everything_down(netns: None) -> None:
    proc, mark = start(["--nodes", "2", "--exec", "sh", "-c", "echo up; exec sleep 60"])
    try:
        assert read_line(proc, 60) == "up\n"
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        done = finish(proc, mark)
    assert done.rc == 130, done.err
    assert_nothing_left(done)


# ---- arguments: refused before anything is created (no root needed) --------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "1"], "--nodes 1 is invalid: expected a whole number from 2 to 32"),
        (["--nodes", "33"], "--nodes 33 is invalid: expected a whole number from 2 to 32"),
        (["--rate", "fast"], "--rate fast is invalid: expected a rate above 0 like 1gbit"),
        (["--rate", "0mbit"], "--rate 0mbit is invalid"),
        (["--delay-us", "1.5"], "--delay-us 1.5 is invalid: expected a whole number of microseconds"),
        (["--delay-us", "-3"], "--delay-us -3 is invalid"),
        (["--port", "70000"], "--port 70000 is invalid"),
        (["--exec"], "--exec needs a command"),
        (["--exec", "no-such-command-here"], "--exec: no-such-command-here not found"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(args: list[str], message: str) -> None:
    rest = [] if "--exec" in args else ["model", "prompt"]
    done = subprocess.run([str(SCRIPT), *args, *rest], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"netns-cluster.sh: {message}" in done.stderr, done.stderr


# ---- serving across the emulated hosts while a link is cut ------------------------------------------------

# Runs in every namespace. Nodes 1 and 2 serve as `launch` agents. Node 0 runs the front end itself,
# then, from its own namespace: the tiny model is created, a greedy stream read as the reference, and
# a second stream whose 10th token cuts node 2's link (its veth's bridge end, in the bridge's namespace,
# goes down): the stream must finish with the same text. The link comes back up, node 2 rejoins by
# itself, and a third stream gives the same text again. Node 0 writes what it saw to DIR/result.
CUT_CLIENT = r"""
import json, os, signal, subprocess, sys, time
import httpx

d, model_path = sys.argv[1], sys.argv[2]
rank, nnodes = os.environ["NODE_RANK"], os.environ["NNODES"]
common = ["tp-ollama", "launch", "--nnodes", nnodes, "--node-rank", rank,
          "--master-addr", os.environ["MASTER_ADDR"], "--master-port", os.environ["MASTER_PORT"]]
if rank != "0":
    os.execvp(common[0], common)
log = open(os.path.join(d, "node0.log"), "w")
node0 = subprocess.Popen(common + ["--port", "18555"], stdout=log, stderr=subprocess.STDOUT)
url = "http://127.0.0.1:18555"
result = {}

def wait(what, predicate, timeout=120):
    end = time.monotonic() + timeout
    while not predicate():
        assert node0.poll() is None, "node 0 exited"
        assert time.monotonic() < end, "not within %d s: %s" % (timeout, what)
        time.sleep(0.1)

def answers():
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False

def nodes():
    group = httpx.get(url + "/api/distributed/status", timeout=30).json()["membership"]["replicas"][0]
    return group["nodes"]

def stream(on_token=None):
    body = {"model": "tiny", "prompt": "hello world, the quick", "raw": True,
            "options": {"temperature": 0, "num_predict": 24}}
    text, times = "", []
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            chunk = json.loads(line)
            assert "error" not in chunk, chunk
            times.append(time.monotonic())
            text += chunk.get("response", "")
            if on_token is not None:
                on_token(len(times))
    gaps = [b - a for a, b in zip(times, times[1:])]
    return text, max(gaps) if gaps else 0.0

try:
    wait("node 0 serving", answers)
    wait("three nodes in the group", lambda: nodes() == 3)
    r = httpx.post(url + "/api/create", json={"model": "tiny", "from": model_path, "stream": False}, timeout=120)
    assert r.status_code == 200, r.text
    result["reference"], _ = stream()
    netns = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True).stdout
    pid = netns.strip().split("-")[1]
    link = ["ip", "-n", "tpo-%s-br" % pid, "link", "set", "tpo%sb2" % pid]
    cut = []
    def cut_node_2(n):
        if n == 10 and not cut:
            subprocess.run(link + ["down"], check=True)
            cut.append(time.monotonic())
    result["cut"], result["cut_gap_s"] = stream(cut_node_2)
    result["nodes_while_cut"] = nodes()
    subprocess.run(link + ["up"], check=True)
    wait("node 2 back in the group", lambda: nodes() == 3)
    result["after"], _ = stream()
    result["events"] = [e["kind"] for e in httpx.get(url + "/api/distributed/events", timeout=30).json()["events"]]
finally:
    with open(os.path.join(d, "result"), "w") as f:
        json.dump(result, f)
    node0.send_signal(signal.SIGINT)
    node0.wait(60)
"""


def test_a_cut_link_drops_the_node_the_streams_go_on_and_it_rejoins_when_the_link_is_back(
    tiny: Tiny, tmp_path: Path
) -> None:
    client = tmp_path / "client.py"
    client.write_text(CUT_CLIENT)
    done = run(["--nodes", "3", "--port", "29610", "--exec", sys.executable, str(client), str(tmp_path),
                str(tiny.path)])  # fmt: skip
    log = (tmp_path / "node0.log").read_text() if (tmp_path / "node0.log").exists() else ""
    result = json.loads((tmp_path / "result").read_text())
    assert done.rc == 0, done.err + log[-3000:]
    assert result["cut"] == result["reference"] and result["after"] == result["reference"], result
    assert result["nodes_while_cut"] == 2
    # The link went silent: node 2 is dropped after the detect timeout (5 s), then the group re-forms.
    assert 5.0 <= result["cut_gap_s"] < 5.0 + 15.0, result
    assert {"left", "detected", "formed", "replayed", "recovered", "rejoined"} <= set(result["events"]), result
    assert_nothing_left(done)
