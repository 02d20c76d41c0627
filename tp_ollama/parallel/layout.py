"""How a model is split over tensor-parallel ranks: which query heads, KV heads, MLP rows and vocab
rows each rank owns. Computed from the config alone and validated before any weight is read.

Any world size from 1 to n_heads works. Heads are never split inside a head and are spread as
evenly as possible (or in proportion to per-rank weights); when a rank's query heads use several
KV groups, or when tp > n_kv_heads, the rank keeps every KV head its query heads need (KV heads
are then replicated across ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tp_ollama.errors import ConfigError

Span = tuple[int, int]  # [start, end)

# Quantized GGUF blocks cover 32 or 256 values along a row; MLP and vocab splits on such
# boundaries let every rank read whole blocks of its columns.
MLP_ALIGN = 256


def split_units(total: int, weights: Sequence[float], what: str, minimum: int = 1) -> list[Span]:
    """Split `total` units into len(weights) contiguous spans proportional to weights.

    Largest remainder: 4 on 3 even ranks -> 2/1/1, 32 on 3 -> 11/11/10, 32 with 2,1,1 -> 16/8/8.
    Every span gets at least `minimum` units."""
    n = len(weights)
    if total < n * minimum:
        raise ConfigError(f"cannot split {total} {what} over {n} ranks: each rank needs at least {minimum}")
    s = float(sum(weights))
    shares = [total * w / s for w in weights]
    counts = [max(minimum, int(x)) for x in shares]
    # Hand out (or take back) the remainder by largest fractional part, earlier ranks first on ties.
    order = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    k = 0
    while sum(counts) < total:
        counts[order[k % n]] += 1
        k += 1
    while sum(counts) > total:
        i = max((j for j in range(n) if counts[j] > minimum), key=lambda j: (counts[j] - shares[j], j))
        counts[i] -= 1
    spans, start = [], 0
    for c in counts:
        spans.append((start, start + c))
        start += c
    return spans


def check_weights(weights: Sequence[float], count: int, flag: str, counted: str, each: str) -> None:
    """One positive weight per part: `flag` (--tp-weights) has `count` values, `counted` says what
    ("the world size is 3"), `each` what one weight is for ("rank")."""
    shown = ",".join(f"{x:g}" for x in weights)
    if len(weights) != count:
        raise ConfigError(f"{flag} has {len(weights)} values ({shown}) but {counted}: give one weight per {each}")
    if any(x <= 0 for x in weights):
        raise ConfigError(f"{flag} must all be > 0, got {shown}")


def aligned_spans(total: int, weights: Sequence[float], align: int, what: str) -> list[Span]:
    """Split `total` in multiples of `align` (the last span absorbs a ragged tail)."""
    while align > 1 and total // align < len(weights):
        align //= 2
    units = split_units(total // align, weights, what)
    spans = [(a * align, b * align) for a, b in units]
    spans[-1] = (spans[-1][0], total)
    return spans


@dataclass(frozen=True)
class TPLayout:
    world_size: int
    weights: tuple[float, ...]
    head_dim: int
    n_heads: int
    n_kv_heads: int
    q_heads: tuple[Span, ...]  # query heads per rank
    kv_heads: tuple[Span, ...]  # KV heads per rank (overlapping when replicated)
    mlp: tuple[Span, ...]  # intermediate rows per rank
    vocab: tuple[Span, ...]  # vocabulary rows per rank

    @classmethod
    def build(cls, config: Any, world_size: int, weights: Sequence[float] | None = None) -> TPLayout:
        heads, kv = int(config.num_attention_heads), int(config.num_key_value_heads)
        w = tuple(float(x) for x in (weights or [1.0] * world_size))
        if world_size < 1:
            raise ConfigError(f"tensor-parallel degree {world_size} is invalid: expected at least 1")
        check_weights(w, world_size, "--tp-weights", f"the world size is {world_size}", "rank")
        if world_size > heads:
            raise ConfigError(
                f"tensor-parallel degree {world_size} exceeds the model's {heads} attention heads: "
                f"use at most {heads} ranks (heads are never split inside a head)"
            )
        if heads % kv:
            raise ConfigError(f"{heads} query heads are not a multiple of {kv} KV heads")
        q_spans = split_units(heads, w, "attention heads")
        group = heads // kv
        kv_spans = tuple((a // group, (b - 1) // group + 1) for a, b in q_spans)
        return cls(
            world_size=world_size,
            weights=w,
            head_dim=int(config.head_dim),
            n_heads=heads,
            n_kv_heads=kv,
            q_heads=tuple(q_spans),
            kv_heads=kv_spans,
            mlp=tuple(aligned_spans(int(config.intermediate_size), w, MLP_ALIGN, "MLP rows")),
            vocab=tuple(aligned_spans(int(config.vocab_size), w, 64, "vocabulary rows")),
        )

    def describe(self) -> list[dict[str, Any]]:
        """Per-rank shares, for logs and the cluster endpoints."""
        return [
            {
                "rank": r,
                "weight": self.weights[r],
                "q_heads": list(self.q_heads[r]),
                "kv_heads": list(self.kv_heads[r]),
                "mlp_rows": list(self.mlp[r]),
                "vocab_rows": list(self.vocab[r]),
            }
            for r in range(self.world_size)
        ]
