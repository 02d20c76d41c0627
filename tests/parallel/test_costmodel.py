"""The cost model: its arithmetic worked by hand on a small shape, its validation, and — what ties it
to the engine — a real 2-rank run on a tiny random checkpoint whose collectives and shard bytes
must be exactly what the model says."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tp_ollama.bench.random_model import write_random_model
from tp_ollama.errors import ConfigError
from tp_ollama.parallel import costmodel
from tp_ollama.parallel.costmodel import (
    DEFAULT_COLLECTIVE_OVERHEAD_S,
    LOCAL_LINK,
    Calibration,
    Collective,
    Link,
    calibrate,
    collective_s,
    collectives_per_token,
    kv_bytes_per_rank,
    layout_of,
    predict,
    predict_pipeline,
    predict_streams,
    preflight_warning,
    weight_bytes_per_rank,
)
from tp_ollama.parallel.shapes import SHAPES, ModelShape

# 4 query heads over 2 KV heads; MLP rows 768 = 3 x 256 (MLP_ALIGN); vocabulary 320 = 5 x 64.
TINY = ModelShape(
    model_type="llama",
    hidden_size=64,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=320,
    tie_word_embeddings=True,
)


def test_constants_match_the_code_they_model():
    from tp_ollama.checkpoints import quantize
    from tp_ollama.kernels import quant
    from tp_ollama.parallel import fastcomm_tcp

    assert costmodel.HEADER_BYTES == fastcomm_tcp.HEADER.size
    assert costmodel.INT4_TILE == quant.INT4_TILE
    assert costmodel.INT4_GROUP == quantize.INT4_GROUP
    assert costmodel.SCALE_BYTES == quant.SCALE_DTYPE.itemsize


def test_float_weight_bytes_by_hand_tp1_2_3():
    # TP=1, float32: per layer q 64x64, k and v 32x64, o 64x64, gate and up 768x64, down 64x768,
    # two norms of 64; then the tied embedding 320x64 as LM head, the final norm, one rotary table
    # of 8 float32.
    layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 768 * 64 + 2 * 64
    assert weight_bytes_per_rank(TINY, 1, "none", "float32") == [4 * (2 * layer + 320 * 64 + 64) + 8 * 4]
    # TP=2: 2 heads and 1 KV head each, MLP rows in units of 256: 512/256, vocabulary in units of 64:
    # 192/128; plus the plan's kv_map: 2 int64 per layer.
    r0 = 4 * (2 * (32 * 64 + 2 * 16 * 64 + 64 * 32 + 3 * 512 * 64 + 2 * 64) + 192 * 64 + 64) + 32 + 2 * 2 * 8
    r1 = 4 * (2 * (32 * 64 + 2 * 16 * 64 + 64 * 32 + 3 * 256 * 64 + 2 * 64) + 128 * 64 + 64) + 32 + 2 * 2 * 8
    assert weight_bytes_per_rank(TINY, 2, "none", "float32") == [r0, r1]
    # TP=3: rank 0 has 2 heads, ranks 1 and 2 one each; 256 MLP rows each; vocabulary 128/128/64.
    r0 = 4 * (2 * (32 * 64 + 2 * 16 * 64 + 64 * 32 + 3 * 256 * 64 + 2 * 64) + 128 * 64 + 64) + 32 + 2 * 2 * 8
    r1 = 4 * (2 * (16 * 64 + 2 * 16 * 64 + 64 * 16 + 3 * 256 * 64 + 2 * 64) + 128 * 64 + 64) + 32 + 2 * 1 * 8
    r2 = r1 - 4 * 64 * 64  # 64 vocabulary rows fewer
    assert weight_bytes_per_rank(TINY, 3, "none", "float32") == [r0, r1, r2]
    # bfloat16 halves everything but the float32 rotary table and the int64 kv_map.
    assert weight_bytes_per_rank(TINY, 3, "none", "bfloat16")[0] == (r0 - 32 - 32) // 2 + 32 + 32


def test_weighted_split_follows_the_layout():
    # Weights 3,1: rank 0 takes 3 of the 4 heads and most rows, so it reads more.
    fast, slow = weight_bytes_per_rank(TINY, 2, "none", "float32", weights=(3.0, 1.0))
    assert fast > 2 * slow
    assert fast + slow > sum(weight_bytes_per_rank(TINY, 2, "none", "float32"))  # KV heads replicated


def test_int8_and_int4_bytes_by_hand():
    # int8: one byte a weight plus a float32 scale per 32 inputs per output row.
    q8 = lambda rows, cols: rows * cols + 4 * rows * (cols // 32)  # noqa: E731
    layer8 = q8(64, 64) + 2 * q8(32, 64) + q8(64, 64) + 2 * q8(768, 64) + q8(64, 768) + 2 * 64 * 2
    assert weight_bytes_per_rank(TINY, 1, "int8", "bfloat16") == [2 * layer8 + q8(320, 64) + 64 * 2 + 32]
    # int4: half a byte a weight, bf16 scale + zero per 32 inputs per row, for rows in whole tiles of
    # 64; k and v (32 rows) do not fit the kernel and are int8, like the embedding's 320 rows (fits:
    # 320 = 5 x 64).
    q4 = lambda rows, cols: rows * cols // 2 + (cols // 32) * rows * 4  # noqa: E731
    layer4 = q4(64, 64) + 2 * q8(32, 64) + q4(64, 64) + 2 * q4(768, 64) + q4(64, 768) + 2 * 64 * 2
    assert weight_bytes_per_rank(TINY, 1, "int4", "bfloat16") == [2 * layer4 + q4(320, 64) + 64 * 2 + 32]


def test_untied_head_reads_its_rows_and_one_embedding_row():
    untied = ModelShape(**{**TINY.__dict__, "tie_word_embeddings": False})
    tied = weight_bytes_per_rank(TINY, 1, "none", "float32")[0]
    assert weight_bytes_per_rank(untied, 1, "none", "float32")[0] == tied + 64 * 4


def test_weight_bytes_match_measured_packings_of_gemma3_270m():
    """model_bytes of the loaded gemma3:270m in bfloat16. Under --quant int8 its nine Q6_K tensors keep
    their file's scales per 16 inputs (640 x 2048 each), twice the scales the shape-only model counts."""
    gemma = SHAPES["gemma3-270m"]
    q6_k_extra = 9 * 640 * (2048 // 16 - 2048 // 32) * 4
    assert weight_bytes_per_rank(gemma, 1, "int8", "bfloat16") == [303134976 - q6_k_extra]
    assert weight_bytes_per_rank(gemma, 1, "int4", "bfloat16") == [167639296]


def test_kv_bytes():
    # TP=3: KV heads 1/1/1 of 16 dims, 2 layers, keys and values, 100 positions, float32.
    assert kv_bytes_per_rank(TINY, 3, "float32", 100) == [2 * 2 * 16 * 100 * 4] * 3
    assert kv_bytes_per_rank(TINY, 1, "float32", 0) == [0]


def test_collectives_per_token():
    assert collectives_per_token(TINY, 1) == [Collective("broadcast_bytes", 54, 1)]
    assert collectives_per_token(TINY, 3, "bfloat16") == [
        Collective("all_reduce", 64 * 2, 5),
        Collective("broadcast_bytes", 54, 1),
        Collective("all_gather", 16, 1),
    ]
    assert collectives_per_token(TINY, 2, candidates=40)[-1] == Collective("all_gather", 640, 1)
    # gemma3:270m at TP=2 and 3 makes 37 all-reduces, 1 tick broadcast, 1 all-gather a step.
    counts = {c.op: c.per_token for c in collectives_per_token(SHAPES["gemma3-270m"], 2)}
    assert counts == {"all_reduce": 37, "broadcast_bytes": 1, "all_gather": 1}


def test_collective_seconds():
    link = Link.from_us_gbs(1000, 0.001)  # 1 ms, 1e6 bytes/s
    assert link == Link(1e-3, 1e6)
    # every rank sends (16-byte header + 240 bytes) to each of 2 peers
    assert collective_s(link, "all_reduce", 240, 3) == pytest.approx(1e-3 + 2 * 256 / 1e6)
    assert collective_s(link, "broadcast", 8, 2) == pytest.approx(1e-3 + 24 / 1e6)
    assert collective_s(link, "all_reduce", 240, 1) == 0.0


def test_calibration_round_trip_and_prediction_parts():
    cal = calibrate(TINY, "none", "float32", 0.01, 10e9, layer_overhead_s=1e-3, cores=2)
    step_bytes = weight_bytes_per_rank(TINY, 1, "none", "float32")[0]
    assert cal.efficiency == pytest.approx(step_bytes / ((0.01 - 2e-3) * 10e9))
    link = Link.from_us_gbs(50, 1.0)
    tp1 = predict(TINY, 1, link, cal, "none", "float32")
    assert tp1.total_s == pytest.approx(0.01)
    assert tp1.tok_s == pytest.approx(100.0)
    assert tp1.communication_s == 0.0
    tp2 = predict(TINY, 2, link, cal, "none", "float32")
    expected_comm = 5 * (50e-6 + (16 + 256) / 1e9) + (50e-6 + (16 + 54) / 1e9) + (50e-6 + 32 / 1e9)
    assert tp2.communication_s == pytest.approx(expected_comm)
    per_rank = weight_bytes_per_rank(TINY, 2, "none", "float32")[0]  # rank 0 has the larger shard
    sharding = 7 * DEFAULT_COLLECTIVE_OVERHEAD_S  # the sharded step's own work around its 7 collectives
    assert tp2.compute_s == pytest.approx(per_rank / (cal.efficiency * 10e9) + 2e-3 + sharding)
    assert tp2.bytes_per_token() == weight_bytes_per_rank(TINY, 2, "none", "float32")
    assert tp2.per_token_ms()["total"] == pytest.approx(1e3 * (tp2.compute_s + expected_comm))
    # Two ranks on one host: each reads at one rank's rate, and the bus carries both shards' bytes.
    shared = predict(TINY, 2, link, cal, "none", "float32", ranks_per_host=2)
    shards = weight_bytes_per_rank(TINY, 2, "none", "float32")
    roofline = max(max(shards) / (cal.efficiency * 10e9), sum(shards) / 10e9)
    assert shared.compute_s == pytest.approx(roofline + 2e-3 + sharding)
    # A rank that reads near the bus's rate (efficiency 1) leaves the second rank nothing: bus-bound.
    fast = Calibration(read_bandwidth_bytes_s=10e9, efficiency=1.0, layer_overhead_s=1e-3, cores=2)
    bound = predict(TINY, 2, link, fast, "none", "float32", ranks_per_host=2)
    assert bound.compute_s == pytest.approx(sum(shards) / 10e9 + 2e-3 + sharding)
    # Calibrated on one core of a host whose whole bus carries more: the bus bound is the bus's.
    wide = Calibration(read_bandwidth_bytes_s=10e9, efficiency=1.0, layer_overhead_s=1e-3, cores=2,
                       bus_bandwidth_bytes_s=15e9)  # fmt: skip
    widened = predict(TINY, 2, link, wide, "none", "float32", ranks_per_host=2)
    assert widened.compute_s == pytest.approx(max(max(shards) / 10e9, sum(shards) / 15e9) + 2e-3 + sharding)
    assert calibrate(TINY, "none", "float32", 0.01, 10e9, bus_bandwidth_bytes_s=15e9).bus_bandwidth_bytes_s == 15e9
    assert any("share" in n for n in shared.notes)
    # Three ranks on two cores take turns: the per-layer overhead stretches by 3/2.
    crowded = predict(TINY, 3, link, cal, "none", "float32", ranks_per_host=3)
    thirds = weight_bytes_per_rank(TINY, 3, "none", "float32")
    roofline3 = max(max(thirds) / (cal.efficiency * 10e9), sum(thirds) / 10e9)
    assert crowded.compute_s == pytest.approx(roofline3 + 2e-3 * 1.5 + sharding)
    assert any("2 cores" in n for n in crowded.notes)


def test_pipeline_stages_run_in_turn_and_hand_over_once_per_boundary():
    cal = calibrate(TINY, "none", "float32", 0.01, 10e9, layer_overhead_s=1e-3, cores=2, context=8)
    link = Link.from_us_gbs(500, 0.1)
    one = predict_pipeline(TINY, 1, link, cal, "none", "float32", context=8)
    assert one.total_s == pytest.approx(predict(TINY, 1, link, cal, "none", "float32", context=8).total_s)
    two = predict_pipeline(TINY, 2, link, cal, "none", "float32", context=8)
    # The stages read the whole model between them (and stage 0 its embedding row), one after another.
    assert sum(r.weight_bytes for r in two.ranks) == weight_bytes_per_rank(TINY, 1, "none", "float32")[0] + 64 * 4
    assert sum(r.kv_bytes for r in two.ranks) == kv_bytes_per_rank(TINY, 1, "float32", 8)[0]
    assert two.compute_s == pytest.approx(sum(r.compute_s for r in two.ranks))
    assert two.compute_s == pytest.approx(one.compute_s + 64 * 4 / (cal.efficiency * 10e9))
    # A hidden state (float32) to the next stage, the chosen token back, rank 0's tick at each stage's turn.
    hop = (500e-6 + (16 + 64 * 4) / 1e8) + (500e-6 + (16 + 8) / 1e8) + 2 * (500e-6 + (16 + 54) / 1e8)
    assert two.communication_s == pytest.approx(hop)
    tp2 = predict(TINY, 2, link, cal, "none", "float32", context=8)
    assert two.communication_s < tp2.communication_s * 0.6  # 4 messages a token against 7 collectives
    with pytest.raises(ConfigError, match=r"stages=3 is invalid: expected 1\.\.2"):
        predict_pipeline(TINY, 3, link, cal, "none", "float32")


def test_hybrid_stages_split_their_layers_among_their_ranks_and_talk_inside_on_the_host():
    cal = calibrate(TINY, "none", "float32", 0.01, 10e9, layer_overhead_s=1e-3, cores=4, context=8)
    link = Link.from_us_gbs(500, 0.1)
    staged = predict_pipeline(TINY, 2, link, cal, "none", "float32", context=8)
    hybrid = predict_pipeline(TINY, 2, link, cal, "none", "float32", context=8, tp=2)
    assert hybrid.world == 4 and [r.host for r in hybrid.ranks] == [0, 0, 1, 1]
    # Each rank of a stage reads half its stage's bytes; the hops between stages are the same messages.
    assert [r.weight_bytes for r in hybrid.ranks[::2]] == pytest.approx(
        [r.weight_bytes / 2 for r in staged.ranks], abs=8
    )
    assert hybrid.communication_s == pytest.approx(staged.communication_s, rel=0.01)
    # Inside a stage: two all-reduces per layer (one layer per stage here), the embedding's on the first.
    local = LOCAL_LINK.latency_s + (16 + 64 * 4) / LOCAL_LINK.bandwidth_bytes_s + cal.collective_overhead_s
    byte_s = [r.weight_bytes + r.kv_bytes for r in staged.ranks]
    read = sum(b / 2 / (cal.efficiency * 10e9) for b in byte_s)
    inside = 5 * local + LOCAL_LINK.latency_s + (16 + 16) / LOCAL_LINK.bandwidth_bytes_s
    assert hybrid.compute_s == pytest.approx(read + 2 * 1e-3 + inside)


def test_streams_through_stages_keep_every_stage_busy_and_one_node_stays_itself():
    cal = calibrate(TINY, "none", "float32", 0.01, 10e9, layer_overhead_s=0.0, cores=2, context=8)
    link = Link.from_us_gbs(0, 1e3)  # a free link: what is left is the work
    one = predict(TINY, 1, link, cal, "none", "float32", context=8)
    # One node: 8 rows cost twice one row's step, so 8 streams give 4 steps' worth of tokens.
    assert predict_streams(one, 8, one.total_s, 2 * one.total_s, pipeline=False) == pytest.approx(4 / one.total_s)
    two = predict_pipeline(TINY, 2, link, cal, "none", "float32", context=8)
    busiest = max(r.compute_s for r in two.ranks)
    # Two groups of 4 rows, a tick each per stage: 8 tokens every 2 ticks of the busiest stage.
    grow4 = 1 + 3 / 7
    expected = 8 / (2 * busiest * grow4)  # the link's few bytes cost nothing here
    assert predict_streams(two, 8, one.total_s, 2 * one.total_s, pipeline=True) == pytest.approx(expected, rel=1e-3)
    with pytest.raises(ConfigError, match="expected positive values"):
        predict_streams(two, 0, 1.0, 1.0, pipeline=True)


@pytest.mark.parametrize("stages", [1, 2], ids=["tensor", "layerwise"])
def test_the_predictions_meet_the_network_namespace_measurements(stages):
    """bench/results/netns_layerwise_gemma3_*.json: gemma3:270m over two nodes at 0.5 ms and 1 Gbit/s, one stream
    and 8 together, predicted from the one-core single node's runs and the link each run measured,
    within 20%."""
    import json

    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.checkpoints.quantize import auto_packings
    from tp_ollama.parallel.shapes import shape_of
    from tp_ollama.store.embedded import resolve_model

    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    one = json.loads((results / "netns_layerwise_gemma3_one.json").read_text())
    run = json.loads((results / f"netns_layerwise_gemma3_{'pp2' if stages > 1 else 'tp2'}.json").read_text())
    run = run["results"][0]
    ckpt = open_checkpoint(resolve_model("gemma3:270m"))
    shape, quant = shape_of(ckpt.config), auto_packings(ckpt)
    ckpt.close()
    context = run["config"]["prompt_tokens"] + run["config"]["gen_tokens"] // 2
    base = one["results"][0]
    single_s = base["extra"]["step_ms_p50"] / 1e3
    cal = calibrate(shape, quant, "float32", single_s, one["machine"]["read_bandwidth_gbs"] * 1e9, cores=2,
                    context=context, bus_bandwidth_bytes_s=one["machine"]["host_read_bandwidth_gbs"] * 1e9)  # fmt: skip
    link = Link.from_us_gbs(run["extra"]["link"]["latency_us"], run["extra"]["link"]["bandwidth_gbs"])
    if stages > 1:
        p = predict_pipeline(shape, stages, link, cal, quant, "float32", context=context)
    else:
        p = predict(shape, 2, link, cal, quant, "float32", context=context)
    measured = run["extra"]["step_ms_p50"]
    assert abs(p.total_s * 1e3 - measured) / measured < 0.20, (p.total_s * 1e3, measured)
    n = run["streams"]["streams"]
    together = predict_streams(p, n, single_s, n / base["streams"]["decode_tok_s"], pipeline=stages > 1)
    assert together == pytest.approx(run["streams"]["predicted_tok_s"])  # what the bench wrote beside it
    assert abs(together - run["streams"]["decode_tok_s"]) / run["streams"]["decode_tok_s"] < 0.20


def test_calibration_with_context_round_trips():
    cal = calibrate(TINY, "int8", "bfloat16", 0.02, 5e9, layer_overhead_s=0.0, context=1000)
    assert predict(TINY, 1, Link(0, 1), cal, "int8", "bfloat16", context=1000).total_s == pytest.approx(0.02)
    assert predict(TINY, 1, Link(0, 1), cal, "int8", "bfloat16", context=0).total_s < 0.02


def test_preflight_warning_fires_on_a_slow_link_only():
    big = SHAPES["llama3-8b"]
    cal = Calibration(read_bandwidth_bytes_s=20e9, efficiency=0.5, layer_overhead_s=2e-4, cores=8)
    slow = Link.from_us_gbs(9000, 0.01)
    fast = Link.from_us_gbs(5, 10.0)
    tp1 = predict(big, 1, fast, cal, "int8", "bfloat16")
    slow2 = predict(big, 2, slow, cal, "int8", "bfloat16")
    warning = preflight_warning(tp1, slow2)
    assert warning is not None and "\n" not in warning
    assert f"{slow2.tok_s:.1f} tok/s" in warning and f"{tp1.tok_s:.1f} tok/s" in warning
    assert "9000 µs" in warning and "0.01 GB/s" in warning
    assert preflight_warning(tp1, predict(big, 2, fast, cal, "int8", "bfloat16")) is None
    assert preflight_warning(tp1, tp1) is None


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: Link(-1e-6, 1e9), "latency -1e-06"),
        (lambda: Link(0.0, 0.0), "bandwidth 0.0"),
        (lambda: Link.from_us_gbs(10, -1), "bandwidth -1000000000.0"),
        (lambda: weight_bytes_per_rank(TINY, 0, "none", "float32"), "world size 0"),
        (lambda: weight_bytes_per_rank(TINY, 5, "none", "float32"), "exceeds the model's 4 attention heads"),
        (lambda: weight_bytes_per_rank(TINY, 1, "int3", "float32"), "quant 'int3'"),
        (lambda: weight_bytes_per_rank(TINY, 1, "none", "auto"), "dtype 'auto'"),
        (lambda: collective_s(Link(0, 1), "reduce_scatter", 8, 2), "collective 'reduce_scatter'"),
        (lambda: collective_s(Link(0, 1), "all_reduce", -1, 2), "-1 bytes"),
        (lambda: Calibration(0.0, 0.5), "read bandwidth 0.0"),
        (lambda: Calibration(1e9, -0.5), "efficiency -0.5"),
        (lambda: calibrate(TINY, "none", "float32", 1e-4, 1e9, layer_overhead_s=1e-3), "fixed overhead"),
        (lambda: calibrate(TINY, "none", "float32", 0.0, 1e9), "measured time 0.0"),
        (
            lambda: predict(TINY, 2, Link(0, 1), Calibration(1e9, 1.0), "none", "float32", ranks_per_host=0),
            "ranks_per_host=0",
        ),
        (lambda: kv_bytes_per_rank(TINY, 1, "float32", -5), "context -5"),
    ],
)
def test_bad_inputs_name_the_value(call, words):
    with pytest.raises(ConfigError) as e:
        call()
    assert words in str(e.value)


# --- the real engine ------------------------------------------------------------------------------


class RecordingComm:
    """A communicator that notes (op, bytes) of every collective before passing it on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rank, self.world_size, self.stats = inner.rank, inner.world_size, inner.stats
        self.calls: list[tuple[str, int]] = []

    def all_reduce(self, t: Any) -> Any:
        self.calls.append(("all_reduce", t.nbytes))
        return self.inner.all_reduce(t)

    def all_gather(self, t: Any) -> Any:
        self.calls.append(("all_gather", t.nbytes))
        return self.inner.all_gather(t)

    def broadcast(self, t: Any, src: int = 0) -> Any:
        self.calls.append(("broadcast", t.nbytes))
        return self.inner.broadcast(t, src)

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        got = bytes(self.inner.broadcast_bytes(data, src))
        self.calls.append(("broadcast_bytes", len(got)))
        return got

    def close(self) -> None:
        self.inner.close()


def count_collectives(dirs: list[str], dtype: str, tokens: int) -> dict[str, Any]:
    """Runs in each rank: the worker's own load_shard and the engine's loop, greedy decode; per
    checkpoint the (op, bytes) of the collectives of `tokens` steps after the first token, and the
    bytes of weights this rank holds."""
    import torch

    from tp_ollama.engine.direct import generate_ids
    from tp_ollama.engine.options import GenerationOptions, SamplingOptions
    from tp_ollama.kernels.linear import model_bytes
    from tp_ollama.parallel.comm import init_distributed, make_comm
    from tp_ollama.parallel.shard import load_shard

    torch.set_num_threads(1)
    init_distributed("gloo", 60)
    comm = RecordingComm(make_comm("auto", 60))
    out: dict[str, Any] = {"rank": comm.rank}
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=tokens + 1, num_ctx=64)
    for d in dirs:
        model, layout, _ = load_shard(Path(d), comm, dtype)
        gen = generate_ids(model, [5, 6, 7], options, comm=comm, layout=layout)
        next(gen)
        start, before = len(comm.calls), dict(comm.stats)
        assert sum(1 for _ in gen) == tokens
        out[d] = {
            "calls": comm.calls[start:],
            "stats": {k: v - before.get(k, 0) for k, v in comm.stats.items() if v != before.get(k, 0)},
            "model_bytes": model_bytes(model),
        }
    comm.close()
    return out


def test_real_two_rank_decode_makes_the_predicted_collectives(tmp_path):
    from tp_ollama.launch import Cluster, run_workers

    tokens = 4
    shapes = {
        "gemma": ModelShape("gemma3_text", 64, 256, 6, 4, 2, 16, 320, True),
        "llama": ModelShape("llama", 64, 256, 6, 4, 2, 16, 320, False),
    }
    dirs = {k: str(write_random_model(s, tmp_path / k, dtype="float32", layers=2)) for k, s in shapes.items()}
    results = run_workers(Cluster(nproc_per_node=2), count_collectives, list(dirs.values()), "bfloat16", tokens)
    assert sorted(results) == [0, 1]
    for kind, d in dirs.items():
        shape = shapes[kind].with_layers(2)
        predicted = collectives_per_token(shape, 2, "bfloat16")
        expected = Counter({(c.op, c.nbytes): c.per_token * tokens for c in predicted})
        held = weight_bytes_per_rank(shape, 2, "none", "bfloat16")
        for r in (0, 1):
            got = results[r][d]
            assert Counter(got["calls"]) == expected, f"{kind} rank {r}"
            assert got["stats"] == {c.op: c.per_token * tokens for c in predicted}, f"{kind} rank {r}"
            # What a rank holds is what it reads, but an untied embedding: it holds its whole slice
            # of the table (192 or 128 rows of 64 bfloat16) and reads one row.
            a, b = layout_of(shape, 2).vocab[r]
            extra = 0 if shape.tie_word_embeddings else (b - a - 1) * 64 * 2
            assert got["model_bytes"] == held[r] + extra, f"{kind} rank {r}"
