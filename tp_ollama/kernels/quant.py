"""Weight-only quantized weights: int8 and int4, each with scales per group of inputs.

Each packing has a plain reference (`dequantize`) and a fast path:
  - int4 where the native kernels run (tp_ollama.kernels.native): the native kernel in its own
    layout, for decode, batches of decodes and prefill alike; int8 there: a native kernel on weights
    in 16-row blocks (`Int8Weight.blocked`) up to SMALL_BATCH rows of a decode step and for LM heads
    at any row count (more rows, and prefill under `prefill_numerics`, go to the dense path below);
  - otherwise torch's packed CPU kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`),
    which read one activation row at a time and want bfloat16 activations (float32 ones take a scalar
    path 15x slower): up to SMALL_BATCH rows go through them in bfloat16; more rows (prefill)
    dequantize the weight in bfloat16 chunks that stay in cache and use the dense matmul;
  - other devices (CUDA) dequantize and use the dense matmul.
The result comes back in the caller's dtype.

int8:  w[n, k] = q[n, k] * scale[n, g]                       q in -127..127, g = k // group
       (in plain rows, or permuted within 16-row blocks for the native kernel: `plain` undoes it)
int4:  w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]    q in 0..15, g = k // group
int8 scales are float32, so a GGUF block's scale (a float16, or a float16 times a 6- or 8-bit
integer) is held exactly and Q8_0, Q5_0 and Q6_K weights keep their file's values bit for bit; the
group is the block's (32, or 16 for Q6_K), and one whole row (group = K) where only torch's kernels
run (they take one scale per row). int4 scales and zeros are bfloat16: that is what the int4
kernels read, so the reference uses them too.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tp_ollama.kernels import native

# Rows up to which the packed kernels beat dequantizing the weight for a dense matmul (measured on
# gemma3 shapes, 2 cores: int8 from ~16 rows on, int4 from ~128, its unpacking being dearer).
SMALL_BATCH = {"int8": 16, "int4": 128}
CHUNK_ROWS = 8192  # weight rows dequantized at a time on the dense path (~10 MB of bfloat16)
INT4_TILE = 64  # int4 weights need rows in multiples of this: whole tiles of every layout (see int4_layout)
SCALE_DTYPE = torch.bfloat16


@dataclass
class Int8Weight:
    q: torch.Tensor  # (N, K) int8 codes
    scale: torch.Tensor  # (N, K / group) float32
    group: int
    # Both in the native kernel's blocked layout (16-row blocks, see kernels/cpu_kernels.c, tpo_int8_mm),
    # else plain rows. A view of rows on 16-row boundaries of a blocked weight is a blocked weight.
    blocked: bool = False
    _native: native.Int8Matmul | None = field(default=None, repr=False, compare=False)
    _refused: bool = field(default=False, repr=False, compare=False)  # the kernel cannot take these
    _row_scale: torch.Tensor | None = field(default=None, repr=False, compare=False)

    kind = "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    @property
    def per_row(self) -> bool:
        return self.scale.shape[1] == 1

    def plain(self, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (n, K) and scales (n, G) of some rows in plain row order: a slice (on 16-row
        boundaries when blocked) or a tensor of row ids."""
        if not self.blocked:
            return self.q[rows], self.scale[rows]
        n, k = self.shape
        groups = self.scale.shape[1]
        if isinstance(rows, slice):
            a, b, step = rows.indices(n)
            if step != 1 or a % native.BLOCK_ROWS or (b % native.BLOCK_ROWS and b != n):
                raise ValueError(f"rows {a}:{b} of a blocked int8 weight are not whole 16-row blocks")
            return unblock_int8(self.q[a:b], self.scale[a:b])
        ids = rows.reshape(-1)
        block, lane = ids // native.BLOCK_ROWS, ids % native.BLOCK_ROWS
        q = self.q.view(n // native.BLOCK_ROWS, k // 4, native.BLOCK_ROWS, 4)[block, :, lane]  # (S, K/4, 4)
        scale = self.scale.view(n // native.BLOCK_ROWS, groups, native.BLOCK_ROWS)[block, :, lane]  # (S, G)
        return q.reshape(-1, k), scale

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        q, scale = self.plain(rows)
        q, scale = q.to(torch.float32), scale.to(torch.float32)  # (n, K), (n, G)
        n, k = q.shape
        return (q.view(n, -1, self.group) * scale[..., None]).view(n, k).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ids (*S) -> (*S, K): an embedding lookup."""
        return self.dequantize(dtype, ids.reshape(-1)).view(*ids.shape, self.shape[1])

    def row_scale(self) -> torch.Tensor:
        """(N,) bfloat16 scales of a per-row weight, as torch's packed kernel takes them."""
        if self._row_scale is None:
            self._row_scale = self.scale[:, 0].to(torch.bfloat16)
        return self._row_scale

    def to(self, device: torch.device) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device), self.group, self.blocked)

    def native_matmul(self) -> native.Int8Matmul | None:
        """The native kernel bound to these tensors, or None where it does not run here or the weight
        is not in its layout."""
        if self._native is None and not self._refused:
            if not self.blocked or not native.available() or self.q.device.type != "cpu":
                return None
            try:
                self._native = native.Int8Matmul(self.q, self.scale, self.group)
            except ValueError:
                self._refused = True  # asked once: matmuls of this weight run every step
        return self._native


def block_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain codes (N, K) and scales (N, G) -> the blocked layout, new contiguous tensors of the same
    shapes: per 16-row block, codes as (K/4, 16 rows, 4) and scales as (G, 16 rows)."""
    n, k = q.shape
    g, b = scale.shape[1], native.BLOCK_ROWS
    codes = q.reshape(n // b, b, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(n, k)
    scales = scale.reshape(n // b, b, g).transpose(1, 2).contiguous().view(n, g)
    return codes, scales


def unblock_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of block_int8."""
    n, k = q.shape
    g, b = scale.shape[1], native.BLOCK_ROWS
    codes = q.reshape(n // b, k // 4, b, 4).permute(0, 2, 1, 3).reshape(n, k)
    scales = scale.reshape(n // b, g, b).transpose(1, 2).reshape(n, g)
    return codes, scales


def int8_blocks(w: Int8Weight, whole_rows: int | None = None) -> Int8Weight:
    """w in the native kernel's blocked layout where that kernel runs here and takes the shape, else
    w as it is. whole_rows: the rows of the whole weight w is a band of (the layout is the whole's)."""
    n, k = w.shape
    rows = n if whole_rows is None else whole_rows
    if w.blocked or not native.available() or rows % native.BLOCK_ROWS or not native.int8_fits(n, k, w.group):
        return w
    return Int8Weight(*block_int8(w.q, w.scale), w.group, blocked=True)


@dataclass
class Int4Weight:
    packed: torch.Tensor  # (N, K/2) uint8 in this machine's int4 layout (see int4_layout)
    scale_zero: torch.Tensor  # (K/group, N, 2) bfloat16: scale, zero
    group: int
    _native: native.Int4Matmul | None = field(default=None, repr=False, compare=False)

    kind = "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    def codes(self, rows: slice = slice(None)) -> torch.Tensor:
        """(n, K) uint8 codes 0..15 of a row range whose ends are multiples of INT4_TILE."""
        return unpack_int4(self.packed[rows])

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        return self._scaled(self.codes(rows), self.scale_zero[:, rows], dtype)

    def _scaled(self, codes: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes (n, K) with their (G, n, 2) scales and zeros -> (n, K) weights."""
        n, k = codes.shape
        q = codes.view(n, k // self.group, self.group).to(torch.float32)  # (n, G, group)
        sz = scale_zero.to(torch.float32).transpose(0, 1)  # (n, G, 2)
        w = (q - 8.0) * sz[..., 0:1] + sz[..., 1:2]  # broadcast over each group
        return w.view(n, k).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ids (*S) -> (*S, K), read straight from the packed layout."""
        n, k = self.shape
        flat = ids.reshape(-1)
        tile, arrangement = require_int4_layout()
        if arrangement == NATIVE:
            blocks = self.packed.view(n // tile, k // 8, tile, 4)  # (N/16, K/8, 16, 4)
            byte = blocks[flat // tile, :, flat % tile]  # (S, K/8, 4)
            codes = torch.cat([byte & 0x0F, byte >> 4], dim=-1).view(-1, k)  # (S, K)
        else:
            tiles = self.packed.view(n // tile, k, tile // 2)  # (N/tile, K, tile/2)
            within = flat % tile
            halves = arrangement == HALVES
            byte = tiles[flat // tile, :, within % (tile // 2) if halves else within // 2]  # (S, K)
            high = within >= tile // 2 if halves else within % 2 == 1
            codes = torch.where(high[:, None], byte >> 4, byte & 0x0F)  # (S, K)
        return self._scaled(codes, self.scale_zero[:, flat], dtype).view(*ids.shape, k)

    def to(self, device: torch.device) -> Int4Weight:
        return Int4Weight(self.packed.to(device), self.scale_zero.to(device), self.group)

    def native_matmul(self) -> native.Int4Matmul:
        """The native kernel bound to these tensors (made once: a decode step calls it ~70 times)."""
        if self._native is None:
            self._native = native.Int4Matmul(self.packed, self.scale_zero, self.group)
        return self._native


QuantWeight = Int8Weight | Int4Weight


INT8_GROUP = 32  # inputs per int8 scale where the native kernel runs


def int8_group(k: int) -> int:
    """The group an int8 weight of K inputs is quantized in here: INT8_GROUP where the native
    kernel runs (and K is made of such groups), else the whole row (torch's packed kernel, or the
    native one for a K of whole 16-input steps)."""
    return INT8_GROUP if native.available() and k % INT8_GROUP == 0 else k


def int8_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K / group) float32 scales of a (N, K) weight for int8: each group's max|w| / 127 (the
    smallest normal float for an all-zero group)."""
    n, k = w.shape
    if group <= 0 or k % group:
        raise ValueError(f"int8 groups of {group} do not divide a row of {k} inputs")
    wg = w.to(torch.float32).reshape(n, k // group, group)
    return (wg.abs().amax(dim=2) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_int8(
    w: torch.Tensor, group: int | None = None, scale: torch.Tensor | None = None, blocks: bool = True
) -> Int8Weight:
    """Symmetric int8 of a (N, K) weight: each group of `group` inputs (default int8_group(K))
    scaled by int8_scales, unless `scale` (N, K / group) is given (a column slice quantized with its
    whole rows' scales). In the native kernel's layout where it takes the weight (int8_blocks), unless
    `blocks` is False (a band of a weight whose layout the caller decides)."""
    n, k = w.shape
    group = int8_group(k) if group is None else group
    scale = (int8_scales(w, group) if scale is None else scale.to(torch.float32)).reshape(n, k // group)
    wg = w.to(torch.float32).reshape(n, k // group, group)
    q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    plain = Int8Weight(q.view(n, k).contiguous(), scale.contiguous(), group)
    return int8_blocks(plain) if blocks else plain


def int4_fits(shape: tuple[int, ...], group: int) -> bool:
    """Whether the int4 kernels take this (N, K): N in whole tiles, K in whole groups (the native
    kernel's groups being whole 16-float vectors)."""
    layout = int4_layout()
    return (
        len(shape) == 2
        and shape[0] % INT4_TILE == 0
        and shape[1] % group == 0
        and shape[1] % 2 == 0
        and layout is not None
        and (layout[1] != NATIVE or group % native.GROUP_MULTIPLE == 0)
    )


def quantize_int4(w: torch.Tensor, group: int = 32) -> Int4Weight:
    """Asymmetric int4 per group of `group` inputs: each group's min..max spread over 0..15."""
    n, k = w.shape
    if not int4_fits((n, k), group):
        raise ValueError(f"int4 needs rows in multiples of {INT4_TILE} and columns in groups of {group}; got {n}x{k}")
    wg = w.to(torch.float32).view(n, k // group, group)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)  # (N, G)
    scale = ((hi - lo) / 15.0).clamp_min(torch.finfo(torch.float32).tiny).to(SCALE_DTYPE).to(torch.float32)
    # Choose the zero so that code 0 lands on the group minimum: w = (q - 8) * scale + zero.
    zero = (lo + 8.0 * scale).to(SCALE_DTYPE).to(torch.float32)
    q = torch.round((wg - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15).to(torch.uint8)
    return pack_int4_weight(q.view(n, k), scale.t(), zero.t(), group)


def pack_int4_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> Int4Weight:
    """codes (N, K) 0..15, scale and zero (K/group, N) -> an Int4Weight in the kernel's layout."""
    scale_zero = torch.stack([scale, zero], dim=-1).to(SCALE_DTYPE).contiguous()  # (G, N, 2)
    return Int4Weight(pack_int4(codes), scale_zero, group)


# How 4-bit codes sit in Int4Weight.packed: (rows per tile, arrangement).
NATIVE = "native"  # the native kernel's: 16-row blocks of 8-input chunks (see kernels/cpu_kernels.c)
HALVES = "halves"  # torch's: byte d of an input's tile holds rows d and d + tile/2
PAIRS = "pairs"  # torch's: byte d of an input's tile holds rows 2d and 2d + 1


@functools.cache
def int4_layout() -> tuple[int, str] | None:
    """The int4 layout of this process: the native kernel's where it runs, else torch's (see
    torch_int4_layout); None when neither is to be had, and int4 is not offered."""
    if native.available():
        return (native.BLOCK_ROWS, NATIVE)
    return torch_int4_layout()


@functools.cache
def torch_int4_layout() -> tuple[int, str] | None:
    """How torch._convert_weight_to_int4pack_for_cpu lays out codes on this CPU, found by packing a
    probe. In each tile, every input k has tile/2 bytes; byte d holds rows d and d + tile/2 (halves)
    or rows 2d and 2d + 1 (pairs), low nibble first. torch picks the layout by CPU capability
    (AVX512: 64 halves, AVX2: 32 halves, otherwise 32 pairs). None: no known layout matches."""
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return None
    probe = torch.randint(0, 16, (3 * INT4_TILE, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    torch_packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    for layout in ((64, HALVES), (32, HALVES), (32, PAIRS)):
        if torch.equal(_pack(probe, *layout), torch_packed):
            return layout
    return None


def require_int4_layout() -> tuple[int, str]:
    layout = int4_layout()
    if layout is None:
        raise RuntimeError("this torch build packs int4 weights in a layout tp-ollama does not know")
    return layout


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8 in this process's layout (see int4_layout). For torch's
    layouts this is what torch._convert_weight_to_int4pack_for_cpu gives (a test holds them equal),
    built here so that unpack_int4 is its exact inverse."""
    return _pack(codes, *require_int4_layout())


def _pack(codes: torch.Tensor, tile: int, arrangement: str) -> torch.Tensor:
    n, k = codes.shape
    c = codes.to(torch.uint8)
    if arrangement == NATIVE:
        t = c.view(n // tile, tile, k // 8, 2, 4).permute(0, 2, 1, 3, 4)  # (N/16, K/8, 16, half, 4)
        return (t[..., 0, :] | (t[..., 1, :] << 4)).reshape(n, k // 2).contiguous()
    t = c.view(n // tile, tile, k).transpose(1, 2)  # (N/tile, K, tile)
    halves = arrangement == HALVES
    low, high = (t[..., : tile // 2], t[..., tile // 2 :]) if halves else (t[..., 0::2], t[..., 1::2])
    return (low | (high << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor, layout: tuple[int, str] | None = None) -> torch.Tensor:
    """The inverse of pack_int4: (N, K/2) uint8 -> (N, K) uint8 codes."""
    tile, arrangement = layout if layout is not None else require_int4_layout()
    n, k = packed.shape[0], packed.shape[1] * 2
    if arrangement == NATIVE:
        t = packed.view(n // tile, k // 8, tile, 1, 4)
        both = torch.cat([t & 0x0F, t >> 4], dim=3)  # (N/16, K/8, 16, half, 4)
        return both.permute(0, 2, 1, 3, 4).reshape(n, k)
    t = packed.view(n // tile, k, tile // 2)  # (N/tile, K, tile/2)
    low, high = t & 0x0F, t >> 4
    if arrangement == HALVES:
        rows = torch.cat([low, high], dim=-1)  # (N/tile, K, tile)
    else:
        rows = torch.stack([low, high], dim=-1).view(n // tile, k, tile)
    return rows.transpose(1, 2).reshape(n, k)


def packed_kernels_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")


_numerics = threading.local()
# Matmuls of at least this many rows give each row the same result whatever the others are (CPU GEMM
# kernels take other paths for fewer rows); a prefill pads its rows to this many (engine/batch.py).
ROW_INVARIANT_ROWS = 16


def in_prefill() -> bool:
    """Whether the caller computes inside `prefill_numerics`."""
    return bool(getattr(_numerics, "prefill", False))


@contextlib.contextmanager
def prefill_numerics() -> Iterator[None]:
    """Matmuls and attention inside compute each row as a prompt's prefill does, whatever the number
    of rows.

    A prompt whose first blocks come from the prefix cache prefills only its tail, a few rows, and
    the same request must answer as it did the first time (a seed makes output reproducible). So
    inside: weights other than native int4 (and LM heads) take the dense path for any number of rows
    (the native int8 kernel's int8 activations and torch's packed kernels differ from it in the last
    bits),
    attention takes a row-invariant form (models/common.py), and the caller gives every matmul at
    least ROW_INVARIANT_ROWS rows where it can."""
    before = getattr(_numerics, "prefill", False)
    _numerics.prefill = True
    try:
        yield
    finally:
        _numerics.prefill = before


def quant_matmul(x: torch.Tensor, w: QuantWeight, head: bool = False) -> torch.Tensor:
    """x (*, K) @ w.T -> (*, N) in x's dtype. `head`: an LM head, whose few rows (a prompt's last
    position, a step's sequences) take the native int8 kernel at any count, prefill or not: it
    computes each row alone, so one path serves any number of rows, and a vocabulary-sized weight is
    never dequantized."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    # The native int4 kernel beats dequantizing for a dense matmul at every batch measured (1-512 rows).
    # The native int8 kernel does up to ~64 rows, then takes up to twice as long as the dense matmul.
    native_int8 = w.native_matmul() if isinstance(w, Int8Weight) and x.device.type == "cpu" else None
    if isinstance(w, Int4Weight) and x.device.type == "cpu" and native_int4():
        y = w.native_matmul()(x2)
    elif native_int8 is not None and head:
        y = native_int8(x2)
    elif in_prefill():  # one path for any number of rows (prefill_numerics)
        y = _dense_matmul(x2, w)
    elif native_int8 is not None and rows <= SMALL_BATCH["int8"]:
        y = native_int8(x2)
    elif rows <= SMALL_BATCH[w.kind] and packed_kernels_available(x.device) and _torch_packs(w):
        xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
        if isinstance(w, Int8Weight):
            y = torch._weight_int8pack_mm(xb, w.q, w.row_scale())
        else:
            y = torch._weight_int4pack_mm_for_cpu(xb, w.packed, w.group, w.scale_zero)
    else:
        y = _dense_matmul(x2, w)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y.reshape(*lead, w.shape[0])


def _torch_packs(w: QuantWeight) -> bool:
    """Whether torch's packed kernels take w: int4, and int8 with one scale per row."""
    return isinstance(w, Int4Weight) or (w.per_row and not w.blocked)


def native_int4() -> bool:
    """Whether int4 weights here are in the native kernel's layout."""
    layout = int4_layout()
    return layout is not None and layout[1] == NATIVE


def _dense_matmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """Dequantize CHUNK_ROWS weight rows at a time (in cache), multiply densely."""
    compute = torch.bfloat16 if x.device.type == "cpu" else x.dtype
    xc = x.to(compute)
    n = w.shape[0]
    if n <= CHUNK_ROWS:
        return _dense_chunk(xc, w, slice(None))
    out = torch.empty(x.shape[0], n, dtype=compute, device=x.device)
    for a in range(0, n, CHUNK_ROWS):
        out[:, a : a + CHUNK_ROWS] = _dense_chunk(xc, w, slice(a, a + CHUNK_ROWS))
    return out


def _dense_chunk(x: torch.Tensor, w: QuantWeight, rows: slice) -> torch.Tensor:
    if isinstance(w, Int8Weight) and w.per_row and not w.blocked:
        # A per-row scale commutes with the matmul: scale the (M, n) result, not the weight.
        return F.linear(x, w.q[rows].to(x.dtype)) * w.scale[rows, 0].to(x.dtype)
    if isinstance(w, Int8Weight) and w.blocked and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.linear(x, native.int8_to_bf16(w.q[rows], w.scale[rows], w.group))  # one pass, not several
    return F.linear(x, w.dequantize(x.dtype, rows))
