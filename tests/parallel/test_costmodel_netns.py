"""The cost model against the simulated network: a TP=2 group across two network namespaces
(launch/netns-cluster.sh), at two emulated link latencies, decodes at the speed the cost model predicts
from the model's shape, a TP=1 calibration run and the link as `bench decode` measured it, within 20%.

Both "hosts" are namespaces of this one machine: they share its memory bus, so the prediction is made
with --ranks-per-host 2 (the bus), while the link is the emulated one. A small random model keeps the
weights in cache, so compute is steady and the link carries most of a token's time (at 0.2 ms the
model reads ~14% low: every collective also waits for the slower rank's jitter, which it leaves out). Measured and
predicted are the median token's time (bench decode's step_ms_p50). The two cores are shared with
whatever else the machine runs, and one TP=1 run can land 15% off the next: a miss is measured again
(calibration and group) up to ATTEMPTS times, so a model that is wrong fails every time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.parallel.test_netns_cluster import SCRIPT, netns_unavailable, script_env
from tp_ollama.bench.random_model import write_random_model
from tp_ollama.launch import free_port
from tp_ollama.parallel.shapes import ModelShape

# Network namespaces and the machine-wide lists of them: one such test at a time (pytest-xdist).
pytestmark = pytest.mark.xdist_group("netns")

SHAPE = ModelShape(
    model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, vocab_size=2048, tie_word_embeddings=True,
)  # fmt: skip
DECODE = ["--dtype", "float32", "--prompt-tokens", "16", "--gen-tokens", "64", "--no-progress"]
TOLERANCE = 0.20
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    return write_random_model(SHAPE, tmp_path_factory.mktemp("shape") / "model", dtype="float32")


def calibrate(model: Path, out: Path) -> None:
    """TP=1 with one thread, as each emulated host has one core (the script gives every node 1 thread)."""
    cmd = [sys.executable, "-m", "tp_ollama", "bench", "decode", str(model), "--tp", "1", "--rounds", "2", *DECODE,
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=script_env("calibrate"))
    assert done.returncode == 0, done.stderr


def across_namespaces(model: Path, delay_us: int, calibration: Path, out: Path) -> dict[str, Any]:
    decode = " ".join([
        "tp-ollama bench decode", str(model), "--tp 2", *DECODE, "--rounds 1", "--calibration", str(calibration),
        "--ranks-per-host 2", "--out", str(out), '--nnodes "$NNODES" --node-rank "$NODE_RANK"',
        '--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"',
    ])  # fmt: skip
    cmd = [str(SCRIPT), "--nodes", "2", "--delay-us", str(delay_us), "--port", str(free_port()), "--timeout",
           str(int(RUN_TIMEOUT)), "--exec", "sh", "-c", decode]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT + 30, env=script_env("costmodel"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    return result


ATTEMPTS = 3


@pytest.mark.timing
@pytest.mark.parametrize("delay_us", [500, 2000])
def test_predicted_tp2_time_is_within_20_percent_of_the_namespaces(model: Path, tmp_path: Path, delay_us: int) -> None:
    misses = []
    for attempt in range(ATTEMPTS):
        calibration = tmp_path / f"tp1-{attempt}.json"
        calibrate(model, calibration)
        result = across_namespaces(model, delay_us, calibration, tmp_path / f"tp2-{attempt}.json")
        link = result["extra"]["link"]
        # The link as measured, not as configured: at least the emulated delay (a busy machine only adds to it)...
        assert link["latency_us"] >= delay_us, link
        predicted, measured = result["predicted_ms_per_token"], result["measured_ms_per_token"]
        assert result["prediction_error"] == pytest.approx(predicted / measured - 1)
        # ... and not wildly more: a busy moment can add that much, so such an attempt is measured again, as a
        # missed prediction is; an emulation that is wrong misses every time.
        emulated = link["latency_us"] < delay_us + 400
        if emulated and abs(predicted / measured - 1) <= TOLERANCE:
            return
        misses.append((link["latency_us"], predicted, measured, result["extra"]["predicted_per_token_ms"],
                       result["per_token_ms"]))  # fmt: skip
    pytest.fail(
        f"in every attempt, the link measured 400 µs or more over its {delay_us} µs delay, or predicted vs measured"
        f" ms per token were off by more than {TOLERANCE:.0%}: {misses}"
    )
