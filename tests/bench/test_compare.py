"""`tp-ollama bench compare` on a tiny random llama: its targets parsed and refused, the bandwidth fraction
of each round, and a real run of tp-ollama at TP=1 and 2 beside the transformers peer in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tp_ollama.bench import schema as bench_schema
from tp_ollama.bench.compare import _paired_fractions, parse_engine_target, run_compare
from tp_ollama.errors import ConfigError


def test_each_round_is_held_against_the_bandwidth_probed_around_it() -> None:
    # 2 ranks of 1e9 bytes; rounds at 10, 20, 5 tok/s; probes 40 | 50 | 20 | 25 GB/s around them
    medians, by_round = _paired_fractions([10**9, 10**9], [10.0, 20.0, 5.0], [40.0, 50.0, 20.0, 25.0])
    assert by_round == [[10 / 50] * 2, [20 / 50] * 2, [5 / 25] * 2]
    assert medians == [0.2, 0.2]


def test_compare_targets_parse_and_refuse() -> None:
    t = parse_engine_target("fast@tp-ollama:tp=2,quant=int8")
    assert (t.label, t.kind, t.options) == ("fast", "tp-ollama", {"tp": 2, "quant": "int8"})
    assert parse_engine_target("transformers").label == "transformers"
    with pytest.raises(ConfigError, match="'vllm' is invalid"):
        parse_engine_target("vllm")
    with pytest.raises(ConfigError, match="option 'threads=2' is invalid; tp-ollama takes: tp, quant"):
        parse_engine_target("tp-ollama:threads=2")
    with pytest.raises(ConfigError, match="tp='two' is not a valid tp"):
        parse_engine_target("tp-ollama:tp=two")
    with pytest.raises(ConfigError, match="at least two targets"):
        run_compare("x", ["tp-ollama"])
    with pytest.raises(ConfigError, match="distinct labels"):
        run_compare("x", ["tp-ollama", "tp-ollama"])


def test_compare_end_to_end_through_the_cli(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    targets = ["tp-ollama:dtype=float32", "tp2@tp-ollama:tp=2,dtype=float32", "transformers"]
    cmd = [sys.executable, "-m", "tp_ollama", "bench", "compare", str(checkpoint), "--prompt-tokens", "8",
           "--gen-tokens", "6", "--rounds", "1", "--cold-start", "--no-progress", "--out", str(out)]  # fmt: skip
    cmd += [arg for t in targets for arg in ("--target", t)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    bench_schema.validate(report)
    labels = [r["target"] for r in report["results"]]
    assert labels == ["tp-ollama dtype=float32", "tp2", "transformers"]
    for r in report["results"]:
        assert r["decode_tok_s"] > 0 and r["cold_start_s"] > r["load_s"] > 0
    pairs = {(q["numerator"], q["denominator"]) for q in report["ratios"] if q["metric"] == "decode_tok_s"}
    assert pairs == {(labels[0], labels[1]), (labels[0], labels[2]), (labels[1], labels[2])}
    first = next(q for q in report["ratios"] if q["metric"] == "decode_tok_s")
    num, den = (next(r for r in report["results"] if r["target"] == first[k]) for k in ("numerator", "denominator"))
    assert first["ratio"] == pytest.approx(num["decode_tok_s"] / den["decode_tok_s"])
    assert out.with_suffix(".md").read_text().count("|") > 10
    assert list(tmp_path.glob("compare-*.png"))
    assert "| tp2 |" in done.stdout
    probes = report["machine"]["read_bandwidth_probes_gbs"]  # before the first round and after each
    assert len(probes) == 2 and report["machine"]["read_bandwidth_gbs"] == max(probes) > 0
    for r in report["results"]:  # one round: its fraction is against the higher of the two probes
        (row,) = r["extra"]["bandwidth_fraction_rounds"]
        assert r["bandwidth"]["fraction"] == row
        assert row[0] == pytest.approx(r["bandwidth"]["bytes_per_token"][0] * r["decode_tok_s"] / 1e9 / max(probes))
    # every target's bytes per token count the same float32 keys and values of the same workload
    kv = {r["target"]: r["extra"]["kv_bytes_per_token"] for r in report["results"]}
    assert kv[labels[0]] == kv[labels[2]] and sum(kv[labels[1]]) == kv[labels[0]][0] > 0
