"""Pieces shared by every decoder family: RMSNorm, rotary tables, attention over a KV cache.

Nothing here knows about ranks. Local head counts are derived from weight shapes so that the same
code runs sharded or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tp_ollama.kernels import native
from tp_ollama.kernels.quant import ROW_INVARIANT_ROWS, in_prefill


class LayerCache(Protocol):
    """What attention needs from one layer's KV cache (implemented in tp_ollama.engine.kv_cache)."""

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, n_kv, T, D) at positions (B, T); return keys, values and their positions
        (B, n_kv, S, D), (B, n_kv, S, D), (B, S) to attend over (-1 marks an empty slot). Positions
        may be None when every returned key is visible to every query (no mask needed)."""
        ...


class ModelCache(Protocol):
    def layer(self, index: int) -> LayerCache: ...


@dataclass(frozen=True)
class RopeSpec:
    """How one rotary table is built: HF's rope_parameters entry plus the head dim it rotates."""

    theta: float
    dim: int
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any], dim: int) -> RopeSpec:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            from tp_ollama.errors import ConfigError

            raise ConfigError(f"rope_type {rope_type!r} is not supported: expected one of {sorted(ROPE_TYPES)}")
        return cls(
            theta=float(params["rope_theta"]),
            dim=dim,
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )

    def inv_freq(self, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
        """(dim/2,) float32 inverse frequencies, computed the way transformers computes them."""
        inv = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
        if freq_factors is not None:
            # GGUF llama3 files carry the scaling as a per-frequency divisor tensor (rope_freqs).
            return inv / freq_factors.float()
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


ROPE_TYPES = frozenset({"default", "linear", "llama3"})


class Rotary(nn.Module):
    """cos/sin for given positions. The table is recomputed per call from inv_freq like HF does, which
    keeps float32 results identical to the reference; it is (B, T, dim) and cheap next to the matmuls."""

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", torch.empty(spec.dim // 2), persistent=False)

    def reset_parameters(self, device: torch.device, freq_factors: torch.Tensor | None = None) -> None:
        self.inv_freq = self.spec.inv_freq(freq_factors).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, dim): ready to broadcast over the heads of (B, H, T, dim)."""
        freqs = positions[:, None, :, None].float() * self.inv_freq.float()  # (B, 1, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Embedding(nn.Module):
    """A token embedding table without nn.Embedding's random init: weights always come from a
    checkpoint, and initialising on the meta device costs a second of lazy imports."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The tied LM head: hidden states (*, D) -> logits (*, V) over this table's rows."""
        return F.linear(x, self.weight)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (B, 1, T, D) from Rotary."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. `unit_offset` is Gemma's (1 + w) scaling, applied before the cast
    back; Llama-style scales after the cast. Both orders follow transformers exactly."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        self._scale_cache: tuple[tuple[int, torch.device, bool], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous() and native.available():
            # One native call where torch runs a dozen operators; the same float32 arithmetic, in
            # transformers' order (bfloat16 results, so summation order is below their rounding).
            if self.unit_offset:
                return native.rms_norm_bf16(x, self._unit_scale(), self.eps, scale_after_cast=False)
            if self.weight.dtype == torch.bfloat16:
                return native.rms_norm_bf16(x, self._float_scale(), self.eps, scale_after_cast=True)
        # torch's rms_norm: x * rsqrt(mean(x^2) + eps) [* scale], the same float32 arithmetic.
        shape = (x.shape[-1],)
        if self.unit_offset:
            return F.rms_norm(x.float(), shape, self._unit_scale(), self.eps).type_as(x)
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)

    def _unit_scale(self) -> torch.Tensor:
        """(1 + w) in float32, computed once per weight tensor (norms run ~100 times a step)."""
        return self._cached_scale(lambda w: 1.0 + w.float())

    def _float_scale(self) -> torch.Tensor:
        return self._cached_scale(lambda w: w.float())

    def _cached_scale(self, make: Any) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight.device, self.unit_offset)
        if self._scale_cache is None or self._scale_cache[0] != key:
            self._scale_cache = (key, make(self.weight).contiguous())
        return self._scale_cache[1]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None,
    scale: float,
    window: int | None,
    kv_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) attention by absolute positions.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D); q_pos: (B, T); k_pos: (B, S) with -1 for empty slots.
    Returns (B, Hq, T, D). A key is visible when 0 <= k_pos <= q_pos and, for sliding layers,
    q_pos - k_pos < window (the window counts the query itself, as in transformers); k_pos None:
    the cache vouches that every key is visible.
    kv_map (Hq,) names the KV head of each query head when groups are uneven (a tensor-parallel
    shard whose heads straddle KV groups); without it every Hq/Hkv query heads share one KV head.
    """
    visible = None
    if k_pos is not None:
        qp = q_pos[:, None, :, None]  # (B, 1, T, 1)
        kp = k_pos[:, None, None, :]  # (B, 1, 1, S)
        visible = (kp >= 0) & (kp <= qp)
        if window is not None:
            visible = visible & (qp - kp < window)
    if kv_map is not None:
        k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)  # (B, Hq, S, D)
    if in_prefill():
        return _rowwise_attention(q, k, v, visible, scale)
    # Even groups: SDPA reads each KV head for its query heads without copying K and V.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


QUERY_CHUNK = 64  # query rows whose scores exist at once in _rowwise_attention


def _rowwise_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention whose every query row comes out the same whatever other rows are computed with it
    (SDPA's CPU kernels block the queries by their count, and a row's sums then run in another
    order): scores, softmax and the weighted sum as matmuls of at least ROW_INVARIANT_ROWS rows,
    QUERY_CHUNK rows at a time. Prefill takes it, so that a prompt's tail computed after a prefix-cache
    hit equals what the whole prompt's prefill computed."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    if t < ROW_INVARIANT_ROWS:  # too few rows: compute copies of the last one beside them
        extra = ROW_INVARIANT_ROWS - t
        q = torch.cat([q, q[:, :, -1:].expand(-1, -1, extra, -1)], dim=2)
        if visible is not None:
            visible = torch.cat([visible, visible[:, :, -1:].expand(-1, -1, extra, -1)], dim=2)
        return _rowwise_attention(q, k, v, visible, scale)[:, :, :t]
    kt = k.transpose(-1, -2)
    out = torch.empty_like(q)
    for a in range(0, t, QUERY_CHUNK):
        b = min(t, a + QUERY_CHUNK)
        if b - a < ROW_INVARIANT_ROWS:  # a short last chunk: take it with rows before it
            a = b - ROW_INVARIANT_ROWS
        scores = torch.matmul(q[:, :, a:b], kt) * scale
        if visible is not None:
            scores = scores.masked_fill(~visible[:, :, a:b], float("-inf"))
        out[:, :, a:b] = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
    return out


def project(module: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """module.<name>(x) for each name. A loader may have fused those layers into `module.fused`,
    one matmul whose output splits into their outputs (sizes `module.fused_sizes`), in order."""
    fused = module._modules.get("fused")
    if fused is not None:
        return fused(x).split(module.fused_sizes, dim=-1)
    return tuple(getattr(module, name)(x) for name in names)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D); H comes from the tensor, so a sharded projection just works."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)
