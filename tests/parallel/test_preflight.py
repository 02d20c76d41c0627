"""The pre-flight check of `tp-ollama launch`: a group spanning two nodes over a slow link is warned,
with the measured link in the line; a group on one node is not measured at all. Also its probes:
measure_link's arithmetic and time bound against a simulated link on a simulated clock, and the
read-bandwidth probe that decode's roofline fraction is measured against."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests import tiny
from tp_ollama.errors import ConfigError
from tp_ollama.launch import free_port
from tp_ollama.parallel import preflight
from tp_ollama.parallel.preflight import (
    measure_link,
    measure_stage_weights,
    model_packings,
    read_bandwidth_gbs,
    spans_hosts,
    stage_weights,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama as an HF directory, with a tokenizer (the launch takes a text prompt)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny.save_hf(tiny.make_hf_model("llama"), directory)
    tiny.save_tiny_tokenizer(directory)
    return directory


def test_spans_hosts_reads_torchruns_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert spans_hosts()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not spans_hosts()


def test_the_cost_model_reads_what_a_loaded_model_holds_and_what_auto_makes_of_a_file(tmp_path) -> None:
    """The packings the preflight hands the cost model are the loaded model's own, tensor by tensor, and
    they are what auto_packings reads from the file before loading (the bench's predictions); the cost
    model counts each weight at its own packing (a Q6_K tensor's int8 scales per 16, a float one whole)."""
    from tests.tiny import make_hf_model, write_gguf
    from tp_ollama.checkpoints.loader import load_model, open_checkpoint
    from tp_ollama.checkpoints.quantize import auto_packings
    from tp_ollama.parallel import costmodel
    from tp_ollama.parallel.shapes import shape_of

    write_gguf(make_hf_model("llama"), tmp_path / "m.gguf", "llama", "Q8_0")
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    loaded = model_packings(load_model(ckpt, torch.float32, quant="auto"))
    assert loaded == auto_packings(ckpt)
    down = "model.layers.0.mlp.down_proj"
    assert loaded[down] == ("int8", 32) and set(loaded.values()) == {("int8", 32)}
    shape = shape_of(ckpt.config)

    def cost(packings: dict[str, tuple[str, int]]) -> int:
        return costmodel.weight_bytes_per_rank(shape, 1, packings, "float32")[0]

    n = shape.hidden_size * shape.intermediate_size
    assert cost({**loaded, down: ("int8", 16)}) - cost(loaded) == 4 * n // 16 - 4 * n // 32
    float_down = {k: v for k, v in loaded.items() if k != down}
    assert cost(float_down) - cost(loaded) == 4 * n - (n + 4 * n // 32)


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
    # one warning record in the log format (tp_ollama.logs), from rank 0 of the group
    lines = [line for line in err0.splitlines() if "level=WARN" in line and "TP=2 is predicted at" in line]
    assert len(lines) == 1, err0
    assert "slower than one node" in lines[0]
    latency_us = float(lines[0].split("over a link of ")[1].split(" µs")[0])
    assert latency_us >= 5000  # the link as measured, with its emulated 5 ms
    assert "level=WARN" not in err1  # node 0 says it once


def test_one_node_is_not_measured(checkpoint: Path) -> None:
    cmd = [sys.executable, "-m", "tp_ollama", "generate", str(checkpoint), "Hello", "--temperature", "0",
           "--num-predict", "3", "--tp", "2", "--comm", "tcp"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_OLLAMA_LINK_DELAY_US": "5000"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "level=WARN" not in done.stderr and "predicted" not in done.stderr


# ---- measure_link against a simulated link -----------------------------------------------------


class SimulatedLink:
    """Test double of a communicator whose all-reduce costs `latency_s + bytes / rate` on a simulated
    clock (installed as the module's `time`), so the figures measure_link derives are known exactly."""

    rank, world_size, transport = 0, 2, "simulated"

    def __init__(self, latency_s: float, rate_bytes_s: float | None) -> None:
        self.latency_s, self.rate = latency_s, rate_bytes_s
        self.now = 0.0
        self.calls = 0
        self.broadcasts = 0

    def perf_counter(self) -> float:
        return self.now

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.now += self.latency_s + (t.nbytes / self.rate if self.rate else 0.0)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.broadcasts += 1
        return t


def simulated(monkeypatch: pytest.MonkeyPatch, latency_s: float, rate: float | None) -> SimulatedLink:
    link = SimulatedLink(latency_s, rate)
    monkeypatch.setattr(preflight, "time", SimpleNamespace(perf_counter=link.perf_counter))
    return link


def test_measure_link_recovers_latency_and_bandwidth(monkeypatch: pytest.MonkeyPatch) -> None:
    link = simulated(monkeypatch, latency_s=5e-3, rate=1e8)
    got = measure_link(link)
    assert got["latency_us"] == pytest.approx((5e-3 + 64 / 1e8) * 1e6)
    assert got["bandwidth_gbs"] == pytest.approx(0.1)  # 1e8 B/s: the fixed 5 ms cancels out
    assert "over simulated between 2 ranks" in got["method"] and "(t_large - t_small)" in got["method"]
    assert link.broadcasts == 1  # rank 0's iteration count, shared so that every rank runs as many


@pytest.mark.parametrize(("latency_s", "rate"), [(1e-5, 1e10), (1e-3, 1e9), (4e-2, 1e7), (0.5, 1e6)])
def test_measure_link_stays_within_its_time_budget(
    monkeypatch: pytest.MonkeyPatch, latency_s: float, rate: float
) -> None:
    link = simulated(monkeypatch, latency_s, rate)
    measure_link(link, budget_s=0.1)
    pair = 2 * latency_s + (64 + (1 << 20)) / rate
    timed_pairs = link.calls // 2 - 2  # after the two warm-up pairs (the first untimed)
    assert 1 <= timed_pairs <= preflight.MAX_LINK_ITERS
    # The whole measurement fits the budget, except on a link too slow for even three pairs.
    assert link.now <= max(0.1, 3 * pair) + 1e-9


def test_measure_link_with_given_iterations_and_a_flat_link(monkeypatch: pytest.MonkeyPatch) -> None:
    link = simulated(monkeypatch, latency_s=1e-3, rate=None)  # cost independent of size: noise-like
    got = measure_link(link, iters=3)
    assert link.calls == 4 + 2 * 3 and link.broadcasts == 0
    assert got["bandwidth_gbs"] == pytest.approx((1 << 20) / 1e-3 / 1e9)
    assert "lower bound" in got["method"]
    with pytest.raises(ConfigError, match="expected 4 <= small < large"):
        measure_link(link, small_bytes=1 << 20, large_bytes=64)


def test_read_bandwidth_is_a_rate_and_checks_its_arguments():
    nbytes = 1 << 20
    started = time.perf_counter()
    gbs = read_bandwidth_gbs(threads=1, nbytes=nbytes, tries=2)
    elapsed = time.perf_counter() - started
    # GB/s of reads made within this call: one read of nbytes at that rate fits in the call's own time (a busy
    # machine lengthens both alike), and no core reads 10 TB/s.
    assert 0 < nbytes / (gbs * 1e9) <= elapsed
    assert gbs < 10_000
    with pytest.raises(ValueError, match="nbytes >= 256"):
        read_bandwidth_gbs(nbytes=8)


def test_stage_weights_follow_measured_speeds_and_ignore_noise():
    assert stage_weights([10.0, 9.0], 2) is None  # within 15%: equal stages
    assert stage_weights([10.0, 5.0], 2) == (1.0, 0.5)  # node 1 reads half as fast: half the work
    assert stage_weights([4.0, 4.0, 10.0, 10.0], 2) == (0.4, 1.0)  # a stage's ranks add up (hybrid)
    assert stage_weights([100.0, 1.0, 50.0], 3) == (1.0, 0.1, 0.5)  # never below a tenth


def test_stage_weights_are_not_measured_on_one_host():
    """Ranks of one machine share its memory bus: no measurement, equal stages."""

    class OneHost:  # a test double of a two-rank communicator whose ranks run on this machine
        rank, world_size = 0, 2

        def all_gather(self, t: torch.Tensor) -> torch.Tensor:
            return torch.stack([t, t])

    assert measure_stage_weights(OneHost(), 2) is None
