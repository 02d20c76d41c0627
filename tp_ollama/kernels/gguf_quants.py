"""Dequantization of GGML block formats in torch, bit-identical to `gguf.quants.dequantize`.

Every function maps raw blocks, a uint8 tensor of shape (*lead, type_size), to float32 of shape
(*lead, block_size). The input may be a strided view (a column slice of a row-major tensor): fields
are only ever sliced out of its last dim. The float arithmetic follows gguf-py's numpy code operation
for operation (same products, same order, float32 throughout) so the results match bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

K_SCALE_SIZE = 12  # packed 6-bit scales and mins of Q4_K / Q5_K

_Dequant = Callable[[torch.Tensor], torch.Tensor]


def block_layout(ggml_type: str) -> tuple[int, int]:
    """(block_size in elements, type_size in bytes) of any type gguf-py knows, supported or not."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]


def _f16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian float16 at byte `start` of each block: (*lead, ts) -> (*lead, 1) float32."""
    return raw[..., start : start + 2].view(torch.float16).float()


# The integer unpacking runs on int64 words, eight packed bytes per element: torch's per-element cost
# dominates on small uint8 fields, so this is several times faster than byte-wise ops. The byte masks
# keep every shift inside its byte, and the layouts assume a little-endian host (x86, ARM).
_NIBBLE_MASK = 0x0F0F0F0F0F0F0F0F
_BIT_MASK = 0x0101010101010101
_TWO_BIT_MASK = 0x0303030303030303


def _words(raw: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes start..stop-1 of each block as int64 words: (*lead, ts) -> (*lead, (stop - start) // 8).

    Always a fresh, aligned copy (a view of the block could start at an odd byte).
    """
    field = raw[..., start:stop].clone(memory_format=torch.contiguous_format)
    return field.view(torch.int64)


def _nibbles(words: torch.Tensor, group: int) -> torch.Tensor:
    """Split every `group` words into their low nibbles then their high nibbles, as gguf-py orders them.

    (*lead, n) int64 -> (*lead, n // group, 2, group) int64, each byte holding one 4-bit value.
    """
    w = words.unflatten(-1, (-1, group))
    return torch.stack([w & _NIBBLE_MASK, (w >> 4) & _NIBBLE_MASK], dim=-2)


@functools.cache
def _bit_spread() -> torch.Tensor:
    """(256,) int64: for byte value b, the word whose byte j is 16 if bit j of b is set, else 0."""
    bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # (256, 8)
    return (bits << 4).to(torch.uint8).view(torch.int64).view(256)


def _f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32).clone()


def _f16_type(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _bf16(raw: torch.Tensor) -> torch.Tensor:
    # gguf-py widens the raw 16 bits into the top half of a float32; the shift keeps NaN payloads.
    return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# Symmetric types, x = scale * q for signed integer codes q, one scale per sub-block: `*_parts` give
# the codes (*lead, block_size) int8 and the scales (*lead, sub-blocks, 1) float32 (exact: a float16,
# or one times a small integer), and the dequantizers multiply the two (one rounding, as gguf-py's).


def _q8_0_parts(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Block of 34 bytes: f16 d, 32 x int8.
    return raw[..., 2:].view(torch.int8), _f16(raw, 0).unsqueeze(-1)


def _symmetric(parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    codes, scale = parts  # torch.mul converts int8 -> float32 exactly in the same pass
    return torch.mul(codes.unflatten(-1, (scale.shape[-2], -1)), scale).flatten(-2)


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    return _symmetric(_q8_0_parts(raw))


def _q4(raw: torch.Tensor, qs_at: int) -> torch.Tensor:
    """4-bit values of Q4_0 / Q4_1 / Q5_x: 16 bytes at `qs_at`, elements 0-15 low nibbles, 16-31 high."""
    return _nibbles(_words(raw, qs_at, qs_at + 16), 2).flatten(-3).view(torch.uint8)  # (*lead, 32)


def _q5(raw: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit values of Q5_0 / Q5_1: bit j of the u32 at `qh_at` is bit 4 of element j. (*lead, 32) uint8."""
    qh = torch.take(_bit_spread(), raw[..., qh_at : qh_at + 4].long())  # (*lead, 4) int64 of 0/16 bytes
    return _q4(raw, qh_at + 4) | qh.view(torch.uint8)


def _q4_0_parts(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Block of 18 bytes: f16 d, 16 bytes of nibbles; x = d * (q - 8), q - 8 exact in int8.
    return _q4(raw, 2).view(torch.int8) - 8, _f16(raw, 0).unsqueeze(-1)


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    return _symmetric(_q4_0_parts(raw))


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    # Block of 20 bytes: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m.
    return torch.mul(_q4(raw, 4), _f16(raw, 0)).add_(_f16(raw, 2))


def _q5_0_parts(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Block of 22 bytes: f16 d, u32 high bits, 16 bytes of nibbles; x = d * (q - 16).
    return _q5(raw, 2).view(torch.int8) - 16, _f16(raw, 0).unsqueeze(-1)


def _q5_0(raw: torch.Tensor) -> torch.Tensor:
    return _symmetric(_q5_0_parts(raw))


def _q5_1(raw: torch.Tensor) -> torch.Tensor:
    # Block of 24 bytes: f16 d, f16 m, u32 high bits, 16 bytes of nibbles; x = d * q + m.
    return torch.mul(_q5(raw, 4), _f16(raw, 0)).add_(_f16(raw, 2))


def _k_scale_min(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block (scale, min) of Q4_K / Q5_K as float32 (*lead, 8, 1) each, already times d / dmin.

    The 12 bytes at offset 4 pack eight 6-bit scales and eight 6-bit mins (gguf-py Q4_K.get_scale_min).
    """
    packed = raw[..., 4 : 4 + K_SCALE_SIZE]
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)  # (*lead, 8)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)  # (*lead, 8)
    scale = (_f16(raw, 0) * sc.float()).unsqueeze(-1)
    minimum = (_f16(raw, 2) * mn.float()).unsqueeze(-1)
    return scale, minimum


def _k_nibbles(raw: torch.Tensor, qs_at: int) -> torch.Tensor:
    """The 128 nibble bytes of Q4_K / Q5_K as 8 sub-blocks of 32: (*lead, 8, 4) int64 words.

    Each 32-byte group g holds sub-block 2g in its low nibbles and 2g + 1 in its high ones.
    """
    return _nibbles(_words(raw, qs_at, qs_at + 128), 4).flatten(-3, -2)


def _q4_k(raw: torch.Tensor) -> torch.Tensor:
    # Block of 144 bytes: f16 d, f16 dmin, 12 bytes scales, 128 bytes of nibbles -> 8 sub-blocks of 32.
    scale, minimum = _k_scale_min(raw)
    q = _k_nibbles(raw, 16).view(torch.uint8)  # (*lead, 8, 32)
    return torch.mul(q, scale).sub_(minimum).flatten(-2)


def _q5_k(raw: torch.Tensor) -> torch.Tensor:
    # Block of 176 bytes: f16 d, f16 dmin, 12 bytes scales, 32 bytes high bits, 128 bytes of nibbles.
    # Bit j of high-bit byte l is bit 4 of element l of sub-block j.
    scale, minimum = _k_scale_min(raw)
    shifts = torch.arange(8).view(8, 1)
    qh = (_words(raw, 16, 48).unsqueeze(-2) >> shifts) & _BIT_MASK  # (*lead, 8, 4) words of 0/1 bytes
    q = (_k_nibbles(raw, 48) | (qh << 4)).view(torch.uint8)  # (*lead, 8, 32)
    return torch.mul(q, scale).sub_(minimum).flatten(-2)


def _q6_k_parts(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Block of 210 bytes: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 x int8 scales, f16 d.
    # Each 64-byte half of the nibbles holds 4 groups of 32 (low nibbles of the half's two 32-byte
    # runs, then high); each 32-byte half of the highs gives the same 4 groups bits 0-1, 2-3, 4-5, 6-7.
    scale = (_f16(raw, 208) * raw[..., 192:208].view(torch.int8).float()).unsqueeze(-1)  # (*lead, 16, 1)
    ql = _nibbles(_words(raw, 0, 128), 8).flatten(-3)  # (*lead, 32) words = 8 groups of 32 bytes
    shifts = torch.tensor([0, 2, 4, 6]).view(4, 1)
    qh = (_words(raw, 128, 192).unflatten(-1, (2, 1, 4)) >> shifts) & _TWO_BIT_MASK  # (*lead, 2, 4, 4)
    q = (ql | (qh.flatten(-3) << 4)).view(torch.int8) - 32  # (*lead, 256), q - 32 exact in int8
    return q, scale


def _q6_k(raw: torch.Tensor) -> torch.Tensor:
    return _symmetric(_q6_k_parts(raw))


_DEQUANT: dict[str, _Dequant] = {
    "F32": _f32,
    "F16": _f16_type,
    "BF16": _bf16,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}

SUPPORTED_TYPES: tuple[str, ...] = tuple(_DEQUANT)


def _check_blocks(raw: torch.Tensor, ggml_type: str) -> int:
    """Refuse raw blocks of another dtype or size; returns the type's block size in elements."""
    block_size, type_size = block_layout(ggml_type)
    if raw.dtype != torch.uint8 or raw.shape[-1] != type_size:
        got = f"{raw.dtype} {list(raw.shape)}"
        raise ValueError(f"{ggml_type} blocks must be uint8 (..., {type_size}), got {got}")
    return block_size


_SYMMETRIC_PARTS = {"Q8_0": _q8_0_parts, "Q4_0": _q4_0_parts, "Q5_0": _q5_0_parts, "Q6_K": _q6_k_parts}
SYMMETRIC_TYPES: tuple[str, ...] = tuple(_SYMMETRIC_PARTS)


def symmetric_parts(raw: torch.Tensor, ggml_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw blocks (*lead, type_size) of a symmetric type (SYMMETRIC_TYPES) -> its integer codes
    (*lead, block_size) int8 and scales (*lead, sub-blocks) float32: `dequantize` is their product,
    each scale over block_size / sub-blocks consecutive codes."""
    _check_blocks(raw, ggml_type)
    codes, scale = _SYMMETRIC_PARTS[ggml_type](raw)
    return codes, scale.squeeze(-1)


def symmetric_group(ggml_type: str) -> int:
    """Elements per scale of a symmetric type (SYMMETRIC_TYPES): its block, or its sub-block."""
    block, type_size = block_layout(ggml_type)
    _, scale = symmetric_parts(torch.zeros(1, type_size, dtype=torch.uint8), ggml_type)
    return block // scale.shape[-1]


def dequantize(raw: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Raw blocks (*lead, type_size) uint8 -> float32 (*lead, block_size), a new tensor.

    Raises KeyError for a type not in SUPPORTED_TYPES; callers check types first to name the file.
    """
    block_size = _check_blocks(raw, ggml_type)
    out = _DEQUANT[ggml_type](raw)
    assert out.shape[-1] == block_size, (ggml_type, tuple(out.shape))
    return out
