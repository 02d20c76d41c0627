"""The pre-flight check of `tp-ollama launch`: a group spanning two nodes over a slow link is warned,
with the measured link in the line; a group on one node is not measured at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tp_ollama.bench.preflight import cost_model_quant, spans_hosts
from tp_ollama.launch import free_port


def test_spans_hosts_reads_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert spans_hosts()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not spans_hosts()


def test_cost_model_quant_is_the_most_common_packing() -> None:
    assert cost_model_quant({"dtype": "bfloat16", "weights": {"int4": 126, "int8": 1}}) == "int4"
    assert cost_model_quant({"dtype": "float32", "weights": {"float32": 10}}) == "none"


def launch_two_nodes(checkpoint: Path, delay_us: int) -> tuple[str, str]:
    """Node 0's and node 1's stderr of a one-shot generation over the TCP mesh on loopback."""
    port = str(free_port())
    common = [sys.executable, "-m", "tp_ollama", "launch", str(checkpoint), "Hello", "--temperature", "0",
              "--num-predict", "3", "--nnodes", "2", "--master-port", port, "--comm", "tcp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_OLLAMA_LINK_DELAY_US": str(delay_us)}
    node1 = subprocess.Popen([*common, "--node-rank", "1"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, env=env)  # fmt: skip
    try:
        node0 = subprocess.run([*common, "--node-rank", "0"], capture_output=True, text=True, timeout=180, env=env)
        _, err1 = node1.communicate(timeout=60)
    finally:
        node1.kill()
        node1.wait(timeout=30)
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr + err1
    return node0.stderr, err1


def test_a_slow_link_between_nodes_is_warned(checkpoint: Path) -> None:
    err0, err1 = launch_two_nodes(checkpoint, delay_us=5000)
    lines = [line for line in err0.splitlines() if line.startswith("Warning: TP=2 is predicted at")]
    assert len(lines) == 1, err0
    assert "slower than one node" in lines[0]
    latency_us = float(lines[0].split("over a link of ")[1].split(" µs")[0])
    assert latency_us >= 5000  # the link as measured, with its emulated 5 ms
    assert "Warning" not in err1  # node 0 says it once


def test_one_node_is_not_measured(checkpoint: Path) -> None:
    cmd = [sys.executable, "-m", "tp_ollama", "generate", str(checkpoint), "Hello", "--temperature", "0",
           "--num-predict", "3", "--tp", "2", "--comm", "tcp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_OLLAMA_LINK_DELAY_US": "5000"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr
