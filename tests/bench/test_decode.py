"""`tp-ollama bench decode` on a tiny random llama, with real torchrun ranks: the figures are the runs' own
and the report holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tp_ollama.bench import schema as bench_schema
from tp_ollama.bench.decode import DecodeConfig, kv_read_bytes, prompt_ids, run_decode
from tp_ollama.errors import ConfigError
from tp_ollama.models.gemma3 import Gemma3TextConfig
from tp_ollama.models.llama import FULL, SLIDING


@pytest.fixture(scope="module")
def decode_report(checkpoint: Path) -> dict[str, Any]:
    report = run_decode(str(checkpoint), tp=[1, 2], dtypes=["float32"], prompt_tokens=[8], gen_tokens=[6],
                        read_bandwidth=False, progress=False)  # fmt: skip
    assert report is not None
    return report


@pytest.mark.timing  # shares of a step's time: another test on the cores would land in them
def test_decode_report_holds_each_tp_degree(decode_report: dict[str, Any]) -> None:
    bench_schema.validate(decode_report)
    by_tp = {r["config"]["tp"]: r for r in decode_report["results"]}
    assert sorted(by_tp) == [1, 2]
    for tp, r in by_tp.items():
        assert r["decode_tok_s"] > 0 and r["prompt_tok_s"] > 0
        assert len(r["peak_rss_mb"]) == tp and all(m > 50 for m in r["peak_rss_mb"])
        assert len(r["bandwidth"]["bytes_per_token"]) == tp
        ms = r["per_token_ms"]
        assert ms["total"] == pytest.approx(ms["compute"] + ms["communication"])
    # One rank alone has only its own step broadcast; two ranks spend time in collectives every token.
    assert by_tp[1]["per_token_ms"]["communication"] < 0.05 * by_tp[1]["per_token_ms"]["total"]
    assert by_tp[2]["per_token_ms"]["communication"] > by_tp[1]["per_token_ms"]["communication"]
    assert by_tp[2]["extra"]["collectives_per_token"]["all_reduce"] >= 2 * 3  # two per layer, 3 layers
    assert by_tp[2]["extra"]["link"]["latency_us"] > 0


def test_decode_shards_hold_less_than_the_whole(decode_report: dict[str, Any]) -> None:
    by_tp = {r["config"]["tp"]: r for r in decode_report["results"]}
    whole = by_tp[1]["bandwidth"]["bytes_per_token"][0]
    shards = by_tp[2]["bandwidth"]["bytes_per_token"]
    assert all(s < 0.75 * whole for s in shards)
    assert whole <= sum(shards) < 1.1 * whole  # only norms are held twice


def test_decode_bytes_hold_the_kv_cache_each_rank_reads(decode_report: dict[str, Any], checkpoint: Path) -> None:
    from tp_ollama.checkpoints.loader import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    config = ckpt.config
    ckpt.close()
    by_tp = {r["config"]["tp"]: r for r in decode_report["results"]}
    # 8 prompt positions, 5 decode steps (6 tokens, the first from the prefill), float32 keys and values
    whole = kv_read_bytes(config, config.num_key_value_heads, 4, 8, 5)
    assert by_tp[1]["extra"]["kv_bytes_per_token"] == [whole]
    assert sum(by_tp[2]["extra"]["kv_bytes_per_token"]) == whole  # each rank reads its own KV heads
    assert by_tp[1]["bandwidth"]["bytes_per_token"][0] > whole > 0


def test_kv_read_bytes_by_hand_with_sliding_layers() -> None:
    config = Gemma3TextConfig(
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=2,
        layer_types=(SLIDING, SLIDING, FULL),
    )  # fmt: skip
    # steps at positions 3 and 4: the sliding layers see 2 positions each, the full one 4, then 5
    assert kv_read_bytes(config, 1, 2, 3, 2) == round((2 + 2 + 4 + 2 + 2 + 5) / 2 * 2 * 4 * 2)
    assert kv_read_bytes(config, 3, 2, 3, 2) == 3 * kv_read_bytes(config, 1, 2, 3, 2)
    assert kv_read_bytes(config, 1, 2, 3, 0) == 0


def test_decode_config_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match="tp 0 is invalid"):
        DecodeConfig(tp=0, dtype="float32", quant="none", prompt_tokens=8, gen_tokens=4)
    with pytest.raises(ConfigError, match="generation length 1"):
        DecodeConfig(tp=1, dtype="float32", quant="none", prompt_tokens=8, gen_tokens=1)
    with pytest.raises(ConfigError, match="pp 0 is invalid"):
        DecodeConfig(tp=1, dtype="float32", quant="none", prompt_tokens=8, gen_tokens=4, pp=0)
    with pytest.raises(ConfigError, match="streams 0 is invalid"):
        DecodeConfig(tp=1, dtype="float32", quant="none", prompt_tokens=8, gen_tokens=4, streams=0)


def test_pipeline_stages_are_measured_each_holding_part_of_the_model(checkpoint: Path) -> None:
    """Stages, one request and 4 together: the 4 flow through the stages, which work in the same ticks."""
    report = run_decode(str(checkpoint), tp=[1], pp=[1, 3], dtypes=["float32"], prompt_tokens=[8], gen_tokens=[6],
                        read_bandwidth=False, progress=False, streams=4)  # fmt: skip
    assert report is not None
    bench_schema.validate(report)
    one, staged = report["results"]
    assert (
        "pp" not in one["config"]
        and staged["config"]["pp"] == 3
        and staged["config"]["streams"] == 4
        and staged["target"] == "tp-ollama tp=1 pp=3 auto/float32 x4 streams"
    )
    for r in (one, staged):
        together = r["streams"]
        assert together["streams"] == 4 and together["rounds"][0]["tokens"] == 4 * 6
        assert together["aggregate_tok_s"] > 0 and together["predicted_tok_s"] is None  # no calibration here
    assert staged["streams"]["rounds"][0]["full_ticks"] > 0  # all three stages busy at once
    whole, stages = one["bandwidth"]["bytes_per_token"][0], staged["bandwidth"]["bytes_per_token"]
    assert len(stages) == 3 and all(s < 0.75 * whole for s in stages)
    assert any(n.startswith(f"{staged['target']}: no prediction") for n in report["notes"])  # no calibration here


def test_prompt_ids_are_ordinary_tokens() -> None:
    ids = prompt_ids(64, 320)
    assert len(ids) == 64 and min(ids) >= 80 and max(ids) < 320
    assert prompt_ids(64, 320) == ids  # the same prompt for every target
