"""GGUF blocks straight to the int8 and int4 packings of `tp_ollama.kernels.quant`.

int8: the symmetric types (Q8_0, Q5_0, Q4_0: x = d * q per block of 32; Q6_K: x = d * sc_j * q per
sub-block of 16) keep their integer codes and their scales, exact in float32, as an Int8Weight whose
group is the (sub-)block: the weight holds the file's values bit for bit. `int8_parts` gives them.

int4: 4-bit blocks of `tp_ollama.kernels.quant` (group 32), with no float32
copy of the tensor: the 4-bit codes are taken from the blocks unchanged, in the dequantizer's element
order, and each block's scale / min is re-expressed as a per-32-group scale and zero of

    w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n],   q in 0..15, g = k // 32.

  Q4_0  (block 32: f16 d, 16 bytes qs)           w = d * (q - 8)        scale = d,       zero = 0
  Q4_1  (block 32: f16 d, f16 m, 16 bytes qs)    w = d * q + m          scale = d,       zero = m + 8 * d
  Q4_K  (256: f16 d, f16 dmin, 12 bytes 6-bit    w = d*sc_j * q         scale = d*sc_j,  zero = 8 * scale
         scales/mins, 128 bytes qs; 8 sub-         - dmin*m_j                                - dmin*m_j
         blocks j of 32)

`int4_parts` gives the codes and float32 scale / zero. The products are exact (an f16 times a 4- or
6-bit integer fits float32's 24 bits), and so is the zero's sum unless its two terms differ hugely in
magnitude (random bytes can; quantizer output and Gemma 3's Q4_K tensors do not). Then
(q - 8) * scale + zero rounds the same exact value as gguf's d * q + m and matches it bit for bit;
otherwise it is within about an ulp. `blocks_to_int4` packs them, which
rounds scale and zero to bfloat16 (8 significant bits, a relative error below 2^-8).

The zero is computed from the unrounded scale: with s' = bf16(scale), the packed weight is
(q - 8) * s' + bf16(zero) = w + (q - 8) * (s' - scale) + (bf16(zero) - zero), an error below
8 |scale| 2^-8 + |zero| 2^-8 per element. A zero built from s' instead gives w + q * (s' - scale) + ...,
up to 15 |scale| 2^-8 (measured: about twice the error of this choice, max and mean).
"""

from __future__ import annotations

import torch

from tp_ollama.kernels import gguf_quants
from tp_ollama.kernels.quant import INT4_TILE, Int4Weight, int4_fits, pack_int4_weight

GROUP = 32  # elements per scale / zero: a Q4_0 / Q4_1 block, a Q4_K sub-block
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
INT8_TYPES = frozenset(gguf_quants.SYMMETRIC_TYPES)


def int8_parts(raw: torch.Tensor, ggml_type: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Raw blocks (N, blocks per row, type_size) uint8 of a row-major 2-D tensor of a symmetric type
    -> codes (N, K) int8, scales (N, K / group) float32 and the group (inputs per scale)."""
    if ggml_type not in INT8_TYPES:
        raise ValueError(f"{ggml_type} blocks cannot be kept as int8; only {', '.join(sorted(INT8_TYPES))}")
    if raw.dim() != 3:
        raise ValueError(f"{ggml_type} blocks must be (rows, blocks, type size), got {list(raw.shape)}")
    codes, scale = gguf_quants.symmetric_parts(raw, ggml_type)  # (N, B, block), (N, B, sub-blocks)
    n = raw.shape[0]
    group = codes.shape[-1] // scale.shape[-1]
    return codes.reshape(n, -1).contiguous(), scale.reshape(n, -1).contiguous(), group


def int4_parts(raw: torch.Tensor, ggml_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw blocks (N, blocks per row, type_size) uint8 of a row-major 2-D tensor ->
    codes (N, K) uint8 in 0..15, scale (K/32, N) float32, zero (K/32, N) float32."""
    if ggml_type not in INT4_TYPES:
        raise ValueError(f"{ggml_type} blocks cannot be repacked as int4; only {', '.join(sorted(INT4_TYPES))}")
    block_size, type_size = gguf_quants.block_layout(ggml_type)
    if raw.dtype != torch.uint8 or raw.dim() != 3 or raw.shape[-1] != type_size:
        got = f"{raw.dtype} {list(raw.shape)}"
        raise ValueError(f"{ggml_type} blocks must be uint8 (rows, blocks, {type_size}), got {got}")
    n, n_blocks, _ = raw.shape
    shape = (n, n_blocks * block_size)
    if not int4_fits(shape, GROUP):
        raise ValueError(
            f"a {ggml_type} tensor of shape {shape} does not fit the int4 packing (rows in multiples of {INT4_TILE})"
        )
    # The field extraction of the dequantizers, so the codes come out in their element order.
    if ggml_type == "Q4_K":
        scale, minimum = gguf_quants._k_scale_min(raw)  # (N, blocks, 8, 1) each: d * sc_j, dmin * m_j
        codes = gguf_quants._k_nibbles(raw, 16).view(torch.uint8)  # (N, blocks, 8, 32)
        zero = scale.mul(8.0).sub_(minimum)
    else:
        qs_at = 2 if ggml_type == "Q4_0" else 4
        codes = gguf_quants._q4(raw, qs_at)  # (N, blocks, 32)
        scale = gguf_quants._f16(raw, 0)  # (N, blocks, 1)
        zero = torch.zeros_like(scale) if ggml_type == "Q4_0" else scale.mul(8.0).add_(gguf_quants._f16(raw, 2))
    return codes.reshape(shape), scale.reshape(n, -1).t(), zero.reshape(n, -1).t()


def blocks_to_int4(raw: torch.Tensor, ggml_type: str) -> Int4Weight:
    """Raw Q4_0 / Q4_1 / Q4_K blocks (N, blocks per row, type_size) -> an Int4Weight of group 32.

    Raises ValueError for another type or a shape the int4 kernel does not take (N not a multiple of
    INT4_TILE).
    """
    codes, scale, zero = int4_parts(raw, ggml_type)
    return pack_int4_weight(codes, scale, zero, GROUP)


__all__ = ["GROUP", "INT4_TYPES", "INT8_TYPES", "blocks_to_int4", "int4_parts", "int8_parts"]
