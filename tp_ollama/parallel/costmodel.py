"""A cost model of one decode step (one token) on a tensor-parallel group, to predict tok/s for a
model shape, a group size and a link before running it, and to say when TP would be slower than
one node.

Units: bytes, seconds, bytes per second (GB/s = 1e9 bytes/s, as `bench bandwidth` reports).

    step_s  = compute_s + communication_s                                 tok_s = 1 / step_s

Compute: each rank reads its shard of the weights once per step (plus its part of the KV cache) at
the rate one rank reaches, efficiency x read bandwidth (fitted on a TP=1 run: memory-bound kernels
reach much of the bus, compute-bound ones like the packed int4 kernels on few cores much less), and
pays a fixed dispatch cost per layer for the Python/torch op calls. The ranks of one host share its
memory bus: a host is done when its slowest rank is, but no sooner than the bus can carry the bytes
of all its ranks (a roofline); when a host runs more ranks than cores, they take turns on them:

    host_s[h]  = max(max(bytes[r] for r on h) / (efficiency * read_bandwidth_bytes_s),
                     sum(bytes[r] for r on h) / read_bandwidth_bytes_s)
                 + num_hidden_layers * layer_overhead_s * max(1, ranks_on_h / cores)
    compute_s  = max over hosts of host_s        (the collectives make every rank wait for the slowest)
                 + collectives per token * collective_overhead_s    (world > 1: the sharded step's own
                 work around each collective, hooks and the sharded sampler, ~50 µs on the reference CPU)

    bytes[r]   = weight_bytes_per_rank(...)[r] + kv_bytes_per_rank(...)[r]

Weight bytes of rank r follow TPLayout.build's split (uneven head / row / vocab spans for any N):
  per layer  q (q_heads_r * head_dim, hidden), k and v (kv_heads_r * head_dim, hidden),
             o (hidden, q_heads_r * head_dim), gate and up (mlp_rows_r, hidden), down (hidden, mlp_rows_r);
             Qwen2's q/k/v biases; RMSNorm weights (every rank holds them whole)
  head       the LM head's vocabulary rows (vocab_rows_r, hidden) — the embedding itself when tied;
             an untied embedding costs one looked-up row
  rest       the final norm, rotary inverse frequencies (head_dim / 2 float32 per table), and
             when sharded the plan's kv_map (one int64 per local query head and layer)
A (rows, cols) matrix costs, as tp_ollama.kernels.quant packs it:
  none       rows * cols * dtype bytes
  int8       rows * cols + 4 * rows * cols / group           (int8 codes, a float32 scale per group of
             32 inputs per row, or of the GGUF block's 16 for Q6_K; per row where cols % 32 != 0)
  int4       rows * cols / 2 + 4 * rows * cols / 32          (4-bit codes, bf16 scale + zero per
             group of 32 inputs per row) when rows % 64 == 0 and cols % 32 == 0, else int8
             (what the loader falls back to for shards the CPU int4 kernel does not take)
One packing for every matrix (`quant` "none", "int8" or "int4"), or one per weight (`Packings`, by
module path: what `--quant auto` chose for each tensor of a GGUF file, see
tp_ollama.checkpoints.quantize.auto_packings); a weight it does not name stays float.
Norms, biases, rotary tables and activations stay in the activation dtype (tables: float32).
KV cache read per step: layers * 2 * kv_heads_r * head_dim * context * dtype bytes.

Communication: the collectives of one step (collectives_per_token), each through fastcomm:

    communication_s = sum(per_token * collective_s(link, op, nbytes, world))
    collective_s    = latency_s + (world - 1) * (HEADER_BYTES + nbytes) / bandwidth_bytes_s   (world > 1)

fastcomm's TCP mesh moves every collective as one exchange of 16-byte-header messages: all_reduce
and all_gather send the whole tensor to each of the world - 1 peers and receive one from each
(sends and receives overlap: the link is full duplex, bandwidth is per rank and direction);
broadcast and broadcast_bytes send world - 1 copies from the source, which the last receiver waits
for. `latency_s` is therefore one one-way message delay plus the software cost of one collective
(what a tiny all-reduce costs, as `bench collectives` measures it), not a ping round trip. The
shared-memory transport fits the same formula with its own (smaller) latency and bandwidth. A group
of one moves nothing. Tensors over fastcomm's max_bytes (1 MiB) go through gloo instead; decode's
never do.

Per decode step, the real engine does (checked against comm.stats by tests/parallel/test_costmodel.py):
  all_reduce   2 * layers + 1 of hidden * dtype bytes (after attention, after the MLP, the embedding)
  broadcast_bytes  1 of 54 bytes (rank 0's tick: the step's plan for one decoding sequence,
               engine/protocol.py)
  all_gather   1 of 16 * candidates bytes (the sampler's per-rank (value, id) float64 candidates:
               1 for greedy and unrestricted sampling, top_k with top_k, 1024 for top_p alone)

Calibration: `calibrate` fits `efficiency` from a TP=1 measurement of the same shape, packing and
dtype, given the host's read bandwidth and the per-layer overhead, so that predicting TP=1 gives
the measured time back.

Limits: every host is taken to be like the calibrated one (--tp-weights shape the split, not the
speeds); one efficiency stands for both bandwidth and the packed kernels' arithmetic, which is what
bounds int8/int4 on few cores (bench/results/quant_decode.json: int4 TP=2 on one 2-core host ran at
28.9 tok/s where this model, calibrated on int4 TP=1 at 47.3, says 45.7); sliding-window layers are
charged the whole context (an upper bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.layout import TPLayout
from tp_ollama.parallel.shapes import ModelShape

QUANTS = ("none", "int8", "int4")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPS = ("all_reduce", "all_gather", "broadcast", "broadcast_bytes", "barrier")
# Kept equal to the real modules by tests: fastcomm_tcp.HEADER.size, kernels.quant.INT4_TILE and
# SCALE_DTYPE's size, checkpoints.quantize.INT4_GROUP.
HEADER_BYTES = 16
INT4_TILE = 64
INT4_GROUP = 32
SCALE_BYTES = 2  # an int4 scale or zero (bfloat16)
INT8_GROUP = 32
INT8_SCALE_BYTES = 4  # an int8 scale (float32)
ROTARY_BYTES = 4  # inverse frequencies are float32 whatever the dtype
KV_MAP_BYTES = 8  # one int64 per local query head and layer, read by attention's index_select
# Per weight (module path, as "model.layers.0.mlp.down_proj"): (packing, int8 group; 0 for the default).
Packings: TypeAlias = Mapping[str, tuple[str, int]]
Quant: TypeAlias = str | Packings
TICK_BYTES = 54  # rank 0's encoded tick of a decode step for one sequence (engine/protocol.Tick)
CANDIDATE_BYTES = 16  # the sampler's (logit, id) pair: two float64
# Fixed cost of one layer in one decode step (Python/torch op dispatch), from the decode time of
# random models of hidden size 64 (weight reads negligible) at 2 and 18 layers, one thread, on the
# shared 2-core development machine (load average 3-4 meanwhile): 235-350 µs a Llama block and
# 340-410 µs a Gemma 3 block in float32, 1.5-2x that in bfloat16. Measure it per machine where it
# matters: write_random_model(ModelShape(family, 64, 256, L, 4, 2, 16, 320, True)) at two L.
DEFAULT_LAYER_OVERHEAD_S = 300e-6
# What a sharded step does that a whole one does not, per collective: the plan's hooks around each
# all-reduce, the vocabulary-parallel embedding's masking, the sharded sampler's candidates. Measured on
# the 2-core reference machine as TP=2 rank 0's time outside collectives minus TP=1's time per token,
# over the step's collectives (a 2-layer llama, bench/results/netns_costmodel_*.json): ~50 µs.
DEFAULT_COLLECTIVE_OVERHEAD_S = 50e-6


class Collective(NamedTuple):
    op: str
    nbytes: int
    per_token: int


@dataclass(frozen=True)
class Link:
    """What one collective costs on the network between ranks: a fixed latency, then bandwidth."""

    latency_s: float
    bandwidth_bytes_s: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise ConfigError(f"link latency {self.latency_s!r} s is invalid: expected a finite value >= 0")
        if not math.isfinite(self.bandwidth_bytes_s) or self.bandwidth_bytes_s <= 0:
            raise ConfigError(
                f"link bandwidth {self.bandwidth_bytes_s!r} bytes/s is invalid: expected a finite value > 0"
            )

    @classmethod
    def from_us_gbs(cls, latency_us: float, bandwidth_gbs: float) -> Link:
        return cls(latency_s=float(latency_us) * 1e-6, bandwidth_bytes_s=float(bandwidth_gbs) * 1e9)

    def describe(self) -> str:
        return f"{self.latency_s * 1e6:.4g} µs latency and {self.bandwidth_bytes_s / 1e9:.3g} GB/s"


# Between the ranks of one host (the shared-memory transport), for the collectives inside a hybrid stage.
LOCAL_LINK = Link(latency_s=20e-6, bandwidth_bytes_s=5e9)


@dataclass(frozen=True)
class Calibration:
    """What a host reads per second and what share of it a decode step achieves.

    read_bandwidth_bytes_s: the host's STREAM-like read bandwidth (shared by all its ranks), as the
        calibration run reached it;
    bus_bandwidth_bytes_s: the whole host's, where a calibration run pinned to fewer cores than the
        host's ranks use reached less (None: the same);
    efficiency: the fraction of it that decode's weight reads achieve (fitted by `calibrate`);
    layer_overhead_s: fixed seconds per layer per step (op dispatch), whatever the shard size;
    cores: the host's cores, None when unknown (then ranks are assumed to have a core each)."""

    read_bandwidth_bytes_s: float
    efficiency: float
    layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S
    cores: int | None = None
    collective_overhead_s: float = DEFAULT_COLLECTIVE_OVERHEAD_S
    bus_bandwidth_bytes_s: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.read_bandwidth_bytes_s) or self.read_bandwidth_bytes_s <= 0:
            raise ConfigError(
                f"read bandwidth {self.read_bandwidth_bytes_s!r} bytes/s is invalid: expected a finite value > 0"
            )
        if not math.isfinite(self.efficiency) or self.efficiency <= 0:
            raise ConfigError(f"bandwidth efficiency {self.efficiency!r} is invalid: expected a finite value > 0")
        if not math.isfinite(self.layer_overhead_s) or self.layer_overhead_s < 0:
            raise ConfigError(f"layer overhead {self.layer_overhead_s!r} s is invalid: expected a finite value >= 0")
        if not math.isfinite(self.collective_overhead_s) or self.collective_overhead_s < 0:
            raise ConfigError(
                f"collective overhead {self.collective_overhead_s!r} s is invalid: expected a finite value >= 0"
            )
        bus = self.bus_bandwidth_bytes_s
        if bus is not None and (not math.isfinite(bus) or bus <= 0):
            raise ConfigError(f"bus bandwidth {bus!r} bytes/s is invalid: expected a finite value > 0 (or None)")
        if self.cores is not None and self.cores < 1:
            raise ConfigError(f"cores={self.cores!r} is invalid: expected at least 1 (or None: unknown)")


@dataclass(frozen=True)
class RankCost:
    rank: int
    host: int
    weight_bytes: int
    kv_bytes: int
    compute_s: float  # its host's: the ranks of a host finish together, sharing the bus


@dataclass(frozen=True)
class Prediction:
    world: int
    link: Link
    compute_s: float
    communication_s: float
    total_s: float
    tok_s: float
    ranks: tuple[RankCost, ...]
    collectives: tuple[Collective, ...]
    notes: tuple[str, ...] = ()

    def per_token_ms(self) -> dict[str, float]:
        """The report's per_token_ms."""
        return {
            "compute": self.compute_s * 1e3,
            "communication": self.communication_s * 1e3,
            "total": self.total_s * 1e3,
        }

    def bytes_per_token(self) -> list[int]:
        """Bytes each rank reads per step (weights and KV cache): the report's bandwidth.bytes_per_token."""
        return [r.weight_bytes + r.kv_bytes for r in self.ranks]


def check_quant(quant: Quant) -> Quant:
    for kind in [quant] if isinstance(quant, str) else [k for k, _ in quant.values()]:
        if kind not in QUANTS:
            raise ConfigError(
                f"quant {kind!r} is not supported by the cost model; expected one of {', '.join(QUANTS)} "
                "(resolve `auto` per tensor with tp_ollama.checkpoints.quantize.auto_packings first)"
            )
    return quant


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"dtype {dtype!r} is not supported by the cost model; expected one of {', '.join(DTYPE_BYTES)} "
            "(resolve `auto` with tp_ollama.checkpoints.loader.resolve_dtype first)"
        )
    return DTYPE_BYTES[dtype]


def check_world(world: int) -> int:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ConfigError(f"world size {world!r} is invalid: expected an integer >= 1")
    return world


def matrix_bytes(rows: int, cols: int, quant: str, itemsize: int, group: int = 0) -> int:
    """Bytes of a (rows, cols) weight as the loader packs it (see the module docstring); `group`: an
    int8 weight's inputs per scale, 0 for the default."""
    if quant == "none":
        return rows * cols * itemsize
    if quant == "int4" and rows % INT4_TILE == 0 and cols % INT4_GROUP == 0:
        return rows * cols // 2 + (cols // INT4_GROUP) * rows * 2 * SCALE_BYTES
    group = group or INT8_GROUP
    groups = cols // group if cols % group == 0 else 1
    return rows * cols + rows * groups * INT8_SCALE_BYTES


def _packing(quant: Quant, path: str) -> tuple[str, int]:
    return (quant, 0) if isinstance(quant, str) else quant.get(path, ("none", 0))


def layout_of(shape: ModelShape, world: int, weights: Sequence[float] | None = None) -> TPLayout:
    return TPLayout.build(shape, check_world(world), weights)


def weight_bytes_per_rank(
    shape: ModelShape, world: int, quant: Quant, dtype: str, weights: Sequence[float] | None = None
) -> list[int]:
    """Bytes of weights each rank reads in one decode step, in rank order."""
    check_quant(quant)
    item = dtype_bytes(dtype)
    layout = layout_of(shape, world, weights)
    d, hd = shape.hidden_size, shape.head_dim

    def matrix(path: str, rows: int, cols: int) -> int:
        kind, group = _packing(quant, path)
        return matrix_bytes(rows, cols, kind, item, group)

    out = []
    for r in range(world):
        q = (layout.q_heads[r][1] - layout.q_heads[r][0]) * hd
        kv = (layout.kv_heads[r][1] - layout.kv_heads[r][0]) * hd
        mlp = layout.mlp[r][1] - layout.mlp[r][0]
        vocab = layout.vocab[r][1] - layout.vocab[r][0]
        total = 0
        for i in range(shape.num_hidden_layers):
            attn, ffn = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            total += (
                matrix(f"{attn}.q_proj", q, d)
                + matrix(f"{attn}.k_proj", kv, d)
                + matrix(f"{attn}.v_proj", kv, d)
                + matrix(f"{attn}.o_proj", d, q)
                + matrix(f"{ffn}.gate_proj", mlp, d)
                + matrix(f"{ffn}.up_proj", mlp, d)
                + matrix(f"{ffn}.down_proj", d, mlp)
            )
        layer = ((q + 2 * kv) if shape.qkv_bias else 0) * item
        layer += (shape.hidden_norms_per_layer * d + (2 * hd if shape.qk_norm else 0)) * item
        head = matrix("model.embed_tokens" if shape.tie_word_embeddings else "lm_head", vocab, d)
        if not shape.tie_word_embeddings:
            head += matrix("model.embed_tokens", vocab, d) // vocab  # one looked-up row of this rank's table
        # The plan's kv_map (which KV head each local query head reads) only exists when sharded.
        layer += (q // hd) * KV_MAP_BYTES if world > 1 else 0
        rest = d * item + shape.rotary_tables * (hd // 2) * ROTARY_BYTES
        out.append(total + shape.num_hidden_layers * layer + head + rest)
    return out


def kv_bytes_per_rank(
    shape: ModelShape, world: int, dtype: str, context: int, weights: Sequence[float] | None = None
) -> list[int]:
    """Bytes of keys and values each rank reads in one decode step attending over `context` positions
    (sliding-window layers read at most their window: this is the full-attention upper bound)."""
    if not isinstance(context, int) or context < 0:
        raise ConfigError(f"context {context!r} is invalid: expected a number of positions >= 0")
    item = dtype_bytes(dtype)
    layout = layout_of(shape, world, weights)
    return [shape.num_hidden_layers * 2 * (b - a) * shape.head_dim * context * item for a, b in layout.kv_heads]


def collectives_per_token(
    shape: ModelShape, world: int, dtype: str = "float32", candidates: int = 1
) -> list[Collective]:
    """The collectives of one decode step as the engine calls them (see the module docstring). A
    group of one still broadcasts its tick (comm.stats counts it); it moves nothing."""
    check_world(world)
    if not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"candidates={candidates!r} is invalid: expected at least 1 (1 for greedy)")
    tick = Collective("broadcast_bytes", TICK_BYTES, 1)
    if world == 1:
        return [tick]
    activation = shape.hidden_size * dtype_bytes(dtype)
    return [
        Collective("all_reduce", activation, 2 * shape.num_hidden_layers + 1),
        tick,
        Collective("all_gather", CANDIDATE_BYTES * candidates, 1),
    ]


def collective_s(link: Link, op: str, nbytes: int, world: int) -> float:
    """Seconds of one collective of an `nbytes` tensor over the group (see the module docstring)."""
    if op not in OPS:
        raise ConfigError(f"collective {op!r} is not known; expected one of {', '.join(OPS)}")
    if nbytes < 0:
        raise ConfigError(f"collective size {nbytes!r} bytes is invalid: expected >= 0")
    if check_world(world) == 1:
        return 0.0
    return link.latency_s + (world - 1) * (HEADER_BYTES + nbytes) / link.bandwidth_bytes_s


def calibrate(
    shape: ModelShape,
    quant: Quant,
    dtype: str,
    measured_tp1_s_per_token: float,
    read_bandwidth_bytes_s: float,
    layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S,
    cores: int | None = None,
    context: int = 0,
    bus_bandwidth_bytes_s: float | None = None,
) -> Calibration:
    """Fit the bandwidth efficiency from one TP=1 decode measurement of this shape, packing and
    dtype (with `context` positions in the KV cache on average)."""
    if not math.isfinite(measured_tp1_s_per_token) or measured_tp1_s_per_token <= 0:
        raise ConfigError(f"measured time {measured_tp1_s_per_token!r} s per token is invalid: expected > 0")
    probe = Calibration(read_bandwidth_bytes_s, 1.0, layer_overhead_s, cores)  # validates the inputs
    step_bytes = weight_bytes_per_rank(shape, 1, quant, dtype)[0] + kv_bytes_per_rank(shape, 1, dtype, context)[0]
    fixed = _overhead_s(shape, probe, 1)
    if measured_tp1_s_per_token <= fixed:
        raise ConfigError(
            f"measured {measured_tp1_s_per_token * 1e3:.3f} ms per token is not more than the fixed overhead "
            f"{shape.num_hidden_layers} layers x {layer_overhead_s * 1e6:g} µs = {fixed * 1e3:.3f} ms: "
            "give a smaller layer_overhead_s"
        )
    efficiency = step_bytes / ((measured_tp1_s_per_token - fixed) * read_bandwidth_bytes_s)
    return Calibration(read_bandwidth_bytes_s, efficiency, layer_overhead_s, cores,
                       bus_bandwidth_bytes_s=bus_bandwidth_bytes_s)  # fmt: skip


def predict(
    shape: ModelShape,
    world: int,
    link: Link,
    calibration: Calibration,
    quant: Quant,
    dtype: str,
    ranks_per_host: int = 1,
    weights: Sequence[float] | None = None,
    context: int = 0,
    candidates: int = 1,
) -> Prediction:
    """Seconds per token and tok/s of decode on `world` ranks, `ranks_per_host` to a host (the last
    host takes what is left), over `link`; `weights` as --tp-weights."""
    check_world(world)
    if not isinstance(ranks_per_host, int) or ranks_per_host < 1:
        raise ConfigError(f"ranks_per_host={ranks_per_host!r} is invalid: expected at least 1")
    weight_bytes = weight_bytes_per_rank(shape, world, quant, dtype, weights)
    kv_bytes = kv_bytes_per_rank(shape, world, dtype, context, weights)
    hosts = [r // ranks_per_host for r in range(world)]
    host_s = {}
    for h in sorted(set(hosts)):
        members = [r for r in range(world) if hosts[r] == h]
        per_rank = [weight_bytes[r] + kv_bytes[r] for r in members]
        one_rank = max(per_rank) / (calibration.efficiency * calibration.read_bandwidth_bytes_s)
        bus = sum(per_rank) / (calibration.bus_bandwidth_bytes_s or calibration.read_bandwidth_bytes_s)
        host_s[h] = max(one_rank, bus) + _overhead_s(shape, calibration, len(members))
    ranks = tuple(RankCost(r, hosts[r], weight_bytes[r], kv_bytes[r], host_s[hosts[r]]) for r in range(world))
    collectives = tuple(collectives_per_token(shape, world, dtype, candidates))
    communication = sum(c.per_token * collective_s(link, c.op, c.nbytes, world) for c in collectives)
    sharding = sum(c.per_token for c in collectives) * calibration.collective_overhead_s if world > 1 else 0.0
    compute = max(host_s.values()) + sharding
    total = compute + communication
    return Prediction(
        world=world,
        link=link,
        compute_s=compute,
        communication_s=communication,
        total_s=total,
        tok_s=1.0 / total,
        ranks=ranks,
        collectives=collectives,
        notes=tuple(_notes(calibration, min(ranks_per_host, world))),
    )


def predict_pipeline(
    shape: ModelShape,
    stages: int,
    link: Link,
    calibration: Calibration,
    quant: Quant,
    dtype: str,
    weights: Sequence[float] | None = None,
    context: int = 0,
    tp: int = 1,
    local: Link = LOCAL_LINK,
    by_work: bool = True,
) -> Prediction:
    """Seconds per token of one sequence's decode over `stages` layer-wise stages of `tp` ranks each
    (tp_ollama.parallel.pipeline; tp > 1 is hybrid, a stage's ranks on one host): the stages run one
    after another, so

        compute_s       = sum over stages of (the stage's busiest rank's bytes / (efficiency x read_bandwidth),
                          at least the stage's bytes / the host's bus bandwidth, + its layers x layer_overhead_s)
                          + inside each stage with tp > 1: two all-reduces per layer (and the embedding's on
                          the first, the sampler's all-gather on the last) over the `local` link
        communication_s = (stages - 1) hand-overs (a float32 hidden state broadcast from the stage)
                          + the last stage's token broadcast + one tick broadcast per stage, over `link`

    Stage bytes are its layers' weights and KV cache, plus the embedding row on the first stage and
    the LM head and final norm on the last (the tied embedding on both). One sequence alone goes
    through the stages one tick each (engine/flow.py), so it pays one tick broadcast per stage; with
    several sequences the stages work at once (`predict_streams`). Stages split the layers as
    PipelineLayout.build does (`by_work`)."""
    from tp_ollama.parallel.pipeline import head_units, stage_spans

    check_quant(quant)
    if not isinstance(stages, int) or not 1 <= stages <= shape.num_hidden_layers:
        raise ConfigError(
            f"stages={stages!r} is invalid: expected 1..{shape.num_hidden_layers} (one layer each at least)"
        )
    item = dtype_bytes(dtype)
    whole = weight_bytes_per_rank(shape, 1, quant, dtype)[0]
    d, hd, n = shape.hidden_size, shape.head_dim, shape.num_hidden_layers
    layer = [_layer_bytes(shape, quant, item, i) for i in range(n)]
    ends = whole - sum(layer)  # head, embedding row, final norm, rotary tables
    kv_layer = 2 * shape.num_key_value_heads * hd * context * item
    check_world(tp)
    spans = stage_spans(n, weights or [1.0] * stages, head_units(shape) if by_work else 0.0)
    bus = calibration.bus_bandwidth_bytes_s or calibration.read_bandwidth_bytes_s
    ranks, compute = [], 0.0
    for s, (a, b) in enumerate(spans):
        w = sum(layer[a:b]) + (ends if s == stages - 1 else 0)
        if s == 0 and stages > 1:
            w += d * item  # the looked-up embedding row
        kv = (b - a) * kv_layer
        stage_s = max((w + kv) / tp / (calibration.efficiency * calibration.read_bandwidth_bytes_s),
                      (w + kv) / bus if tp > 1 else 0.0)  # fmt: skip
        share = 1.0 if calibration.cores is None else max(1.0, tp / calibration.cores)
        stage_s += (b - a) * calibration.layer_overhead_s * share
        if tp > 1:  # the stage's own collectives, between its ranks on one host
            reduces = 2 * (b - a) + (1 if s == 0 else 0)
            stage_s += reduces * (collective_s(local, "all_reduce", d * item, tp) + calibration.collective_overhead_s)
            if s == stages - 1:
                stage_s += collective_s(local, "all_gather", CANDIDATE_BYTES, tp)
        compute += stage_s
        ranks += [RankCost(s * tp + r, s, (w + kv) // tp - kv // tp, kv // tp, stage_s) for r in range(tp)]
    collectives = (
        Collective("broadcast", d * 4, stages - 1),
        Collective("broadcast", 8, 1 if stages > 1 else 0),
        Collective("broadcast_bytes", TICK_BYTES, stages),
    )
    world = stages * tp
    communication = sum(c.per_token * collective_s(link, c.op, c.nbytes, world) for c in collectives)
    total = compute + communication
    return Prediction(world=world, link=link, compute_s=compute, communication_s=communication, total_s=total,
                      tok_s=1.0 / total, ranks=tuple(ranks), collectives=collectives)  # fmt: skip


def predict_streams(p: Prediction, streams: int, one_row_s: float, rows_s: float, pipeline: bool) -> float:
    """Aggregate decode tok/s of `streams` sequences decoding together, from the one-sequence
    prediction `p` (of `predict`, or of `predict_pipeline` with `pipeline`) and one node's measured
    step seconds for one row and for `streams` rows: what a row adds to a step on this host, taken
    as the same share of every rank's work. A step of r rows costs a rank's one-row compute times

        grow(r) = 1 + (r - 1) / (streams - 1) x (rows_s / one_row_s - 1)

    - one node or tensor parallel: every rank runs every row each step, the all-reduces carry r rows
      and the sampler's all-gather runs once per sequence:
          tok/s = streams / (compute x grow(streams) + communication)
    - S pipeline stages (engine/flow.py): groups of g = ceil(streams / S) rows, each tick moves every
      group one stage on, and a group's tokens come once every S ticks:
          tick  = max over stages of (stage compute x grow(g)) + hand-overs of g rows + token and tick broadcasts
          tok/s = streams / (S x tick)"""
    if streams < 1 or one_row_s <= 0 or rows_s <= 0:
        raise ConfigError(f"streams={streams}, one_row_s={one_row_s}, rows_s={rows_s}: expected positive values")

    def grow(rows: int) -> float:
        return 1 + (rows - 1) / max(streams - 1, 1) * (rows_s / one_row_s - 1)

    world = p.world
    if pipeline:
        stages = len({r.host for r in p.ranks})  # a stage's ranks share its `host` index
        g = -(-streams // stages)
        tick_comm = 0.0
        for c in p.collectives:
            nbytes = c.nbytes * g if c.op == "broadcast" else c.nbytes
            per_tick = 1 if c.op == "broadcast_bytes" else c.per_token  # one tick broadcast per tick
            tick_comm += per_tick * collective_s(p.link, c.op, nbytes, world)
        tick = max(r.compute_s for r in p.ranks) * grow(g) + tick_comm
        return streams / (stages * tick)
    comm = 0.0
    for c in p.collectives:
        if c.op == "all_reduce":
            comm += c.per_token * collective_s(p.link, c.op, c.nbytes * streams, world)
        elif c.op == "all_gather":
            comm += c.per_token * streams * collective_s(p.link, c.op, c.nbytes, world)
        else:
            comm += c.per_token * collective_s(p.link, c.op, c.nbytes, world)
    return streams / (p.compute_s * grow(streams) + comm)


def _layer_bytes(shape: ModelShape, quant: Quant, item: int, i: int) -> int:
    """Bytes of layer i's weights on one rank holding all of it."""
    d, hd = shape.hidden_size, shape.head_dim
    q, kv, mlp = shape.num_attention_heads * hd, shape.num_key_value_heads * hd, shape.intermediate_size
    attn, ffn = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"

    def matrix(path: str, rows: int, cols: int) -> int:
        kind, group = _packing(quant, path)
        return matrix_bytes(rows, cols, kind, item, group)

    total = (
        matrix(f"{attn}.q_proj", q, d) + matrix(f"{attn}.k_proj", kv, d) + matrix(f"{attn}.v_proj", kv, d)
        + matrix(f"{attn}.o_proj", d, q) + matrix(f"{ffn}.gate_proj", mlp, d) + matrix(f"{ffn}.up_proj", mlp, d)
        + matrix(f"{ffn}.down_proj", d, mlp)
    )  # fmt: skip
    total += ((q + 2 * kv) if shape.qkv_bias else 0) * item
    return total + (shape.hidden_norms_per_layer * d + (2 * hd if shape.qk_norm else 0)) * item


def preflight_warning(prediction_tp1: Prediction, prediction_tpn: Prediction) -> str | None:
    """One line when the group is predicted slower than one node, else None."""
    if prediction_tpn.world <= 1 or prediction_tpn.tok_s >= prediction_tp1.tok_s:
        return None
    p = prediction_tpn
    return (
        f"TP={p.world} is predicted at {p.tok_s:.1f} tok/s, slower than one node at {prediction_tp1.tok_s:.1f} tok/s: "
        f"over a link of {p.link.describe()}, {sum(c.per_token for c in p.collectives)} collectives per token take "
        f"{p.communication_s * 1e3:.1f} ms of the {p.total_s * 1e3:.1f} ms a token would take"
    )


def _overhead_s(shape: ModelShape, calibration: Calibration, ranks_on_host: int) -> float:
    """Dispatch time of one step: per layer, stretched when the host's ranks outnumber its cores."""
    share = 1.0 if calibration.cores is None else max(1.0, ranks_on_host / calibration.cores)
    return shape.num_hidden_layers * calibration.layer_overhead_s * share


def _notes(calibration: Calibration, ranks_per_host: int) -> list[str]:
    notes = []
    if ranks_per_host > 1:
        notes.append(f"{ranks_per_host} ranks share each host's memory bus: TP on one host adds no read bandwidth")
    if calibration.cores is not None and ranks_per_host > calibration.cores:
        notes.append(
            f"{ranks_per_host} ranks per host on {calibration.cores} cores: ranks take turns on the cores, "
            "the per-layer overhead is stretched accordingly"
        )
    return notes
