"""tp_ollama.kernels.quant: packing layout, quantization error, the packed and dense matmul paths, row lookups."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tp_ollama.kernels import native, quant
from tp_ollama.kernels.quant import (
    INT4_TILE,
    Int4Weight,
    Int8Weight,
    int4_fits,
    pack_int4,
    quant_matmul,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

needs_native = pytest.mark.skipif(not native.available(), reason="the native kernels do not run here")
BF16_EPS = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits): |bf16(v) - v| <= |v| * 2**-8


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> bool:
    # (torch.testing.assert_close costs ~0.5 s of imports on first use.)
    return bool(((got - want).abs() <= atol + rtol * want.abs()).all())


@pytest.fixture(params=["native", "torch"])
def layout(request, monkeypatch):
    """Run a test under each int4 layout this machine has: the native kernel's and torch's."""
    if request.param == "native":
        if not native.available():
            pytest.skip("the native int4 kernel does not run here")
        chosen = (native.BLOCK_ROWS, quant.NATIVE)
    else:
        chosen = quant.torch_int4_layout()
    monkeypatch.setattr(quant, "int4_layout", lambda: chosen)
    return request.param


def _int8(n: int = 96, k: int = 256) -> Int8Weight:
    return quantize_int8(torch.randn(n, k))


def _int4(n: int = 3 * INT4_TILE, k: int = 256, group: int = 32) -> Int4Weight:
    return quantize_int4(torch.randn(n, k), group)


# --- 1. int4 packing layout -------------------------------------------------------------------------


# One tile, and several tiles (torch packs rows in blocks of 32 or 64 depending on the CPU capability).
@pytest.mark.parametrize("n", [INT4_TILE, 3 * INT4_TILE])
def test_pack_int4_matches_torch_layout_and_round_trips(n, monkeypatch):
    monkeypatch.setattr(quant, "int4_layout", quant.torch_int4_layout)
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (n, 128), dtype=torch.uint8)
    packed = pack_int4(codes)
    expected = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 64)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed, expected), (
        f"pack_int4 differs from torch's layout (cpu capability {torch.backends.cpu.get_cpu_capability()}) "
        f"at {(packed != expected).sum().item()} of {packed.numel()} bytes"
    )


def test_native_layout_places_each_code_where_the_kernel_reads_it(monkeypatch):
    """Block b, chunk c, byte 4r + i: row 16b + r, input 8c + i (low nibble) and 8c + 4 + i (high)."""
    monkeypatch.setattr(quant, "int4_layout", lambda: (16, quant.NATIVE))
    torch.manual_seed(0)
    n, k = 2 * INT4_TILE, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (n, k // 2) and torch.equal(unpack_int4(packed), codes)
    flat = packed.reshape(-1)
    for row, col in [(0, 0), (0, 5), (17, 9), (n - 1, k - 1), (33, 44)]:
        b, r, c, i = row // 16, row % 16, col // 8, col % 4
        byte = int(flat[b * 16 * k // 2 + c * 64 + 4 * r + i])
        want = byte & 0x0F if col % 8 < 4 else byte >> 4
        assert want == int(codes[row, col]), (row, col)


# --- 2. quantization error ----------------------------------------------------------------------------


@pytest.mark.parametrize("group", [16, 32, 256], ids=lambda g: f"group{g}")
def test_quantize_int8_error_bounded(group):
    torch.manual_seed(0)
    n, k = 64, 256
    w = torch.randn(n, k) * torch.logspace(-3, 1, n)[:, None]  # rows of very different magnitude
    w[5] = 0.0  # an all-zero row must not divide by zero
    w[7, :16] = 0.0  # and neither must an all-zero group
    qw = quantize_int8(w, group)
    codes, scales = qw.plain()
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape == (n, k // group) and qw.group == group
    assert codes.abs().max() <= 127
    wg = w.view(n, k // group, group)
    scale = scales[..., None]  # (N, G, 1)
    err = (qw.dequantize().view(n, k // group, group) - wg).abs()
    # Rounding to the nearest multiple of the float32 scale costs at most scale/2 (1e-6 * scale covers
    # float32 rounding of w / scale and q * scale).
    assert (err <= 0.5 * scale + 1e-6 * scale).all(), f"worst excess {(err - 0.5 * scale).max().item()}"
    assert torch.equal(qw.dequantize()[5], torch.zeros(k))
    # The scale is each group's max / 127 (a smaller one would pass the bound above but clamp the group);
    # an all-zero group gets the smallest normal float instead of 0 (atol).
    assert _close(scales, wg.abs().amax(dim=2) / 127, rtol=1e-6, atol=2.0**-125)


@pytest.mark.parametrize("group", [32, 64])
def test_quantize_int4_error_bounded(group):
    torch.manual_seed(0)
    n, k = 2 * INT4_TILE, 256
    w = torch.randn(n, k) + torch.linspace(-3, 3, n)[:, None]  # groups not centred on 0
    w[3, :group] = 0.7  # a constant group (zero spread)
    qw = quantize_int4(w, group)
    assert qw.packed.shape == (n, k // 2) and qw.scale_zero.shape == (k // group, n, 2)
    assert qw.scale_zero.dtype == torch.bfloat16
    assert int(qw.codes().max()) <= 15
    wg = w.view(n, k // group, group)
    spread = (wg.amax(dim=2) - wg.amin(dim=2))[..., None]  # (N, G, 1)
    scale = qw.scale_zero[..., 0].t().float()[..., None]  # (N, G, 1), as stored
    zero = qw.scale_zero[..., 1].t().float()[..., None]
    err = (qw.dequantize() - w).view(n, k // group, group).abs()
    # Inside the grid zero + (0..15 - 8) * scale rounding costs at most scale/2. The grid's ends are off
    # the group's min and max by the bf16 rounding of zero (|zero| * 2**-8) and of scale (15 * scale
    # differs from the spread by up to spread * 2**-8); values clamped at the ends are off by at most that.
    tol = 0.5 * scale + BF16_EPS * (zero.abs() + spread) + 1e-6 * (zero.abs() + spread)
    assert (err <= tol).all(), f"worst excess {(err - tol).max().item()}"
    assert (err[3, 0] <= 0.7 * BF16_EPS).all()
    # The scale spreads each group's min..max over 16 codes.
    assert _close(scale, spread / 15, rtol=BF16_EPS, atol=2.0**-125)  # atol: the constant group's clamped scale


# --- 3. quant_matmul: packed kernel for small batches, dense path above ---------------------------------


SMALL = 8  # the packed-kernel threshold these cases are built around (patched in for every kind)


LEADS = [(1, 1), (2, SMALL // 2), (1, SMALL + 1), (5, 8)]


@pytest.fixture(params=["native", "torch"])
def int8_kernel(request, monkeypatch):
    """Run a test on the native int8 kernel and on torch's (the native one switched off)."""
    if request.param == "native" and not native.available():
        pytest.skip("the native kernels do not run here")
    if request.param == "torch":  # its weights, as where no native kernel runs: one scale per plain row
        monkeypatch.setattr(quant.Int8Weight, "native_matmul", lambda self: None)
        monkeypatch.setattr(quant, "int8_group", lambda k: k)
        monkeypatch.setattr(quant, "int8_blocks", lambda w, whole_rows=None: w)
    return request.param


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_matmul_matches_dequantized_reference(dtype, lead, int8_kernel, monkeypatch):
    _check_matmul(_int8, dtype, lead, "torch", monkeypatch)


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_matmul_matches_dequantized_reference(dtype, lead, layout, monkeypatch):
    _check_matmul(_int4, dtype, lead, layout, monkeypatch)


def _check_matmul(make, dtype, lead, layout, monkeypatch):
    torch.manual_seed(0)
    n = 3 * INT4_TILE
    w = make(n, 256)
    x = torch.randn(*lead, 256).to(dtype)
    dense_calls = []
    dense = quant._dense_matmul
    monkeypatch.setattr(quant, "_dense_matmul", lambda *a: dense_calls.append(1) or dense(*a))
    monkeypatch.setattr(quant, "SMALL_BATCH", {"int8": SMALL, "int4": SMALL})
    y = quant_matmul(x, w)
    m = lead[0] * lead[1]
    # The native int4 kernel takes every batch size; torch's packed kernels only small ones.
    assert bool(dense_calls) == (m > SMALL and layout == "torch"), "wrong path for this batch size"
    assert y.dtype == dtype and y.shape == (*lead, n)
    ref = x.float() @ w.dequantize().T
    # torch's paths round the activations (and on the dense path the dequantized weight) to bfloat16
    # and return bfloat16: ~2**-8 relative per product, averaging out over K. The native kernel rounds
    # activations to int8 per 16 inputs (steps of max|x| / 127 of the 16), as llama.cpp's Q8_0 does
    # per 32. 2e-2 of the output's scale is a wide margin for both that a wrong layout, scale or zero
    # still exceeds by far.
    diff = (y.float() - ref).abs().max().item()
    assert diff <= 2e-2 * ref.abs().max().item(), f"max diff {diff} vs max |ref| {ref.abs().max().item()}"


@needs_native
def test_native_int4_error_is_that_of_int8_activations():
    """The native kernel against the dequantized weights times the activations rounded as it rounds
    them: all that is left is float32 summation order. Per group it computes
    scale * sum(q * x_rounded) + (zero - 8 * scale) * sum(x_rounded): the zero-point term takes the
    rounded activations too (with the unrounded sum each rounding error would be weighted by the
    unsigned code 0..15 instead of by the weight, about doubling the error)."""
    torch.manual_seed(0)
    m, n, k, group = 7, 2 * INT4_TILE, 256, 32
    packed, sz, _ = _native_parts(n, k, group)
    w = Int4Weight(packed, sz, group)
    x = torch.randn(m, k) * torch.logspace(-2, 1, k)  # groups of very different magnitudes
    y = native.int4_mm(x, packed, sz, group)
    x_rounded = _rounded_activations(x)  # what the kernel multiplies
    scale, zero = sz[..., 0].float(), sz[..., 1].float()  # (G, N)
    codes_scaled = (w.codes().float().view(n, k // group, group) * scale.t()[..., None]).view(n, k)
    ref = x_rounded @ codes_scaled.T + x_rounded.view(m, k // group, group).sum(dim=2) @ (zero - 8 * scale)
    assert torch.allclose(ref, x_rounded @ w.dequantize(torch.float32).T, rtol=1e-4, atol=1e-4)
    diff = (y - ref).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), f"max diff {diff} vs max |ref| {ref.abs().max().item()}"


def _rounded_activations(x: torch.Tensor, group: int = 16) -> torch.Tensor:
    """x with each group of `group` inputs rounded to int8 steps of its max|x| / 127, as the native
    kernels round activations (per 16)."""
    m, k = x.shape
    xg = x.view(m, k // group, group)
    amax = xg.abs().amax(dim=2, keepdim=True)
    return (torch.round(xg * (127 / amax)) * (amax / 127)).view(m, k)


@needs_native
@pytest.mark.parametrize("group", [16, 32, 64, 0], ids=lambda g: f"group{g or 'K'}")
@pytest.mark.parametrize("n, k", [(2 * INT4_TILE, 256), (48, 192)], ids=["many-blocks", "three-blocks"])
def test_native_int8_error_is_that_of_int8_activations(n, k, group):
    """The native int8 kernel against the same products with the activations rounded as it rounds
    them: all that is left is float32 summation order, whatever the weight's group (16 and 32: the
    GGUF blocks kept as they are; a multiple of 64, and a whole row), over many 16-row blocks or three.
    Each row of a batch is the same bits as alone."""
    torch.manual_seed(0)
    group = group or k
    if k % group:
        pytest.skip(f"groups of {group} do not fit rows of {k}")
    w = quantize_int8(torch.randn(n, k) * torch.logspace(-1, 1, k), group)  # weight groups of different scales
    assert w.blocked
    x = torch.randn(7, k) * torch.logspace(-2, 1, k)  # groups of very different magnitudes
    kernel = w.native_matmul()
    assert kernel is not None
    y = kernel(x)
    ref = _rounded_activations(x) @ w.dequantize().T
    diff = (y - ref).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), f"max diff {diff} vs max |ref| {ref.abs().max().item()}"
    alone = torch.cat([kernel(x[i : i + 1]) for i in range(7)])
    assert torch.equal(y, alone), "a row of a batch differs from the row alone"


@needs_native
def test_native_int8_declines_what_it_cannot_take():
    """Rows that are not whole 16-row blocks, groups that are not whole 16-input steps, or a plain
    weight's column slice stay in plain rows on torch's kernels, which still give the right product."""
    torch.manual_seed(0)
    for odd in (_int8(40, 64), quantize_int8(torch.randn(32, 64), 8)):
        assert not odd.blocked and odd.native_matmul() is None
        x = torch.randn(2, 64)
        assert _close(quant_matmul(x, odd), x @ odd.dequantize().T, rtol=0, atol=2e-2 * 64**0.5)
    plain = quantize_int8(torch.randn(32, 128), blocks=False)
    assert Int8Weight(plain.q[:, :64], plain.scale[:, :2], 32).native_matmul() is None


@needs_native
def test_blocked_int8_holds_the_plain_rows():
    """The blocked layout is a permutation: plain rows come back from whole weights, whole-block views
    and row ids alike, and rows cut off a block boundary are copied out in plain order."""
    torch.manual_seed(0)
    plain = quantize_int8(torch.randn(64, 96), 32, blocks=False)
    w = quant.int8_blocks(plain)
    assert w.blocked and w.q.shape == plain.q.shape and w.scale.shape == plain.scale.shape
    assert not torch.equal(w.q, plain.q)
    assert all(torch.equal(a, b) for a, b in zip(w.plain(), (plain.q, plain.scale), strict=True))
    ids = torch.tensor([63, 0, 17, 17, 40])
    assert all(torch.equal(a, b) for a, b in zip(w.plain(ids), (plain.q[ids], plain.scale[ids]), strict=True))
    assert torch.equal(w.dequantize(rows=slice(16, 48)), plain.dequantize(rows=slice(16, 48)))
    with pytest.raises(ValueError, match="16-row blocks"):
        w.plain(slice(8, 24))
    from tp_ollama.checkpoints.quantize import slice_rows

    view, cut = slice_rows(w, 16, 48), slice_rows(w, 8, 24)
    assert view.blocked and view.q.data_ptr() == w.q[16].data_ptr()
    assert not cut.blocked and torch.equal(cut.dequantize(), plain.dequantize(rows=slice(8, 24)))


def _native_parts(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(k // group, n) * 0.1
    zero = torch.randn(k // group, n) * 0.1
    sz = torch.stack([scale, zero], dim=-1).to(torch.bfloat16).contiguous()
    return quant._pack(codes, native.BLOCK_ROWS, quant.NATIVE), sz, group


@needs_native
def test_native_int4_computes_each_row_on_its_own():
    """Rows of a batch (passes of 4 rows and the rest one by one) equal each row alone, bit for bit:
    sharing a step with other sequences changes nothing in the kernel."""
    torch.manual_seed(0)
    packed, sz, group = _native_parts(2 * INT4_TILE, 128, 32)
    x = torch.randn(7, 128)
    together = native.int4_mm(x, packed, sz, group)
    alone = torch.cat([native.int4_mm(x[i : i + 1], packed, sz, group) for i in range(7)])
    assert torch.equal(together, alone)


@needs_native
def test_native_int4_reads_a_view_of_some_rows():
    """Fused q/k/v parts are row views: their scales are strided, which the kernel follows."""
    torch.manual_seed(0)
    packed, sz, group = _native_parts(4 * INT4_TILE, 128, 32)
    x = torch.randn(3, 128)
    whole = native.int4_mm(x, packed, sz, group)
    part = native.int4_mm(x, packed[INT4_TILE : 3 * INT4_TILE], sz[:, INT4_TILE : 3 * INT4_TILE], group)
    assert torch.equal(part, whole[:, INT4_TILE : 3 * INT4_TILE])


@needs_native
def test_native_int4_refuses_shapes_it_cannot_take():
    packed, sz, _ = _native_parts(INT4_TILE, 64, 32)
    with pytest.raises(ValueError, match="groups of 24"):
        native.int4_mm(torch.randn(1, 64), packed, sz, 24)
    with pytest.raises(ValueError, match="activations 1x32 do not fit"):
        native.int4_mm(torch.randn(1, 32), packed, sz, 32)


# --- 4. the chunk loop of the dense path -------------------------------------------------------------


# Chunks must end on int4 tiles; 3 tiles per chunk over 4 tiles of rows leaves a partial last chunk.
@pytest.mark.parametrize("tiles_per_chunk", [1, 3])
@pytest.mark.parametrize("make", [_int8, _int4], ids=["int8", "int4"])
def test_dense_path_chunked_equals_unchunked(make, tiles_per_chunk, monkeypatch):
    monkeypatch.setattr(quant, "int4_layout", quant.torch_int4_layout)  # the native kernel has no dense path
    torch.manual_seed(0)
    n, chunk = 4 * INT4_TILE, tiles_per_chunk * INT4_TILE
    w = make(n, 128)
    x = torch.randn(2, 8, 128)
    monkeypatch.setattr(quant, "SMALL_BATCH", {"int8": 8, "int4": 8})  # 16 rows: the dense path
    whole = quant_matmul(x, w)
    monkeypatch.setattr(quant, "CHUNK_ROWS", chunk)
    calls = []
    chunk_fn = quant._dense_chunk
    monkeypatch.setattr(quant, "_dense_chunk", lambda x, w, rows: calls.append(rows) or chunk_fn(x, w, rows))
    chunked = quant_matmul(x, w)
    assert len(calls) == -(-n // chunk), "the chunk loop did not run"
    assert chunked.shape == whole.shape == (2, 8, n)
    # Chunking changes only how the bf16 matmul is blocked; allow a few bf16 ulps of the output's scale.
    assert _close(chunked.float(), whole.float(), rtol=0, atol=1e-2 * whole.abs().max().item())


# --- 5. embedding lookups ----------------------------------------------------------------------------


# Both tiles of a 2-tile weight; even and odd rows, first and second half of a tile (whichever rows share a byte).
T = INT4_TILE
IDS = torch.tensor([[0, 1, T // 2 + 1], [2 * T - 1, T + T // 2, T - 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make", [_int8, _int4], ids=["int8", "int4"])
def test_rows_equals_dequantized_rows(make, dtype, monkeypatch):
    monkeypatch.setattr(quant, "int4_layout", quant.torch_int4_layout)
    _check_rows(make, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@needs_native
def test_native_int4_rows_equal_dequantized_rows(dtype, monkeypatch):
    monkeypatch.setattr(quant, "int4_layout", lambda: (native.BLOCK_ROWS, quant.NATIVE))
    _check_rows(_int4, dtype)


def _check_rows(make, dtype):
    torch.manual_seed(0)
    w = make(2 * INT4_TILE, 128)
    got = w.rows(IDS, dtype)
    assert got.shape == (2, 3, 128) and got.dtype == dtype
    assert torch.equal(got, w.dequantize(dtype)[IDS])


# --- 6. shape checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(INT4_TILE + 16, 64), (INT4_TILE, 48)])
def test_quantize_int4_rejects_shape(shape):
    with pytest.raises(ValueError, match=f"{shape[0]}x{shape[1]}"):
        quantize_int4(torch.randn(*shape), group=32)


@pytest.mark.parametrize(
    ("shape", "group", "fits"),
    [
        ((T, 64), 32, True),
        ((3 * T, 256), 64, True),
        ((T + 16, 64), 32, False),  # rows not whole tiles
        ((T // 2, 64), 32, False),
        ((T, 96), 64, False),  # columns not whole groups
        ((T, 32), 16, True),
        ((T, 3), 1, False),  # an odd number of columns cannot be packed two per byte
        ((T, 64, 1), 32, False),
        ((T,), 32, False),
    ],
)
def test_int4_fits(shape, group, fits):
    assert int4_fits(shape, group) is fits


# --- the packed int4 layout depends on torch's CPU capability -----------------------------------------

_CAPABILITY_CHECK = """
import torch
from tp_ollama.kernels import quant
torch.manual_seed(0)
n = 3 * quant.INT4_TILE
codes = torch.randint(0, 16, (n, 128), dtype=torch.uint8)
same = torch.equal(quant.pack_int4(codes), torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
w = quant.quantize_int4(torch.randn(n, 128))
x = torch.randn(1, 128)
ref = x @ w.dequantize().T
rel = ((quant.quant_matmul(x, w).float() - ref).abs().max() / ref.abs().max()).item()
print(torch.backends.cpu.get_cpu_capability(), same, rel)
"""
# ATEN_CPU_CAPABILITY can only lower the capability; AVX2 is the common x86 one without AVX512.
_LOWER_CAPABILITY = {"AVX512": "avx2", "AVX2": "default"}


def test_int4_packed_path_under_a_lower_cpu_capability():
    """torch packs int4 differently per CPU capability (DEFAULT, AVX2 and AVX512 all differ) and the same
    weights may run on any CPU: rerun the layout and packed-matmul checks under a lower x86 capability."""
    cap = _LOWER_CAPABILITY.get(torch.backends.cpu.get_cpu_capability())
    if cap is None:
        pytest.skip(f"no lower capability to try from {torch.backends.cpu.get_cpu_capability()}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, native.ENV_SWITCH: "0"}
    proc = subprocess.run([sys.executable, "-c", _CAPABILITY_CHECK], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got, same, rel = proc.stdout.split()
    assert got.lower() == cap
    assert same == "True", f"{got}: pack_int4 differs from torch's layout"
    assert float(rel) <= 2e-2, f"{got}: packed int4 matmul off by {float(rel):.2f} of the output scale"


@needs_native
@pytest.mark.parametrize("make", [_int8, _int4], ids=["int8", "int4"])
def test_native_matmuls_write_large_outputs(make):
    """A (24, 65536) output (6 MiB: a fresh mapping, far above the first 2 GiB of addresses) is written
    where it is: every pointer reaches the kernel whole (a binding that declared one argument too few
    once passed the output's address as a C int)."""
    torch.manual_seed(0)
    w = make(65536, 64)
    x = torch.randn(24, 64)
    y = w.native_matmul()(x)
    ref = x @ w.dequantize().T
    assert (y - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@needs_native
@pytest.mark.parametrize("group", [16, 32, 64])
def test_native_int8_to_bf16_is_the_dequantized_weight(group):
    """The prefill's dense path expands int8 weights to bfloat16 in one native pass: bit for bit what
    dequantize(bfloat16) gives, for the rows of a view too; a group it cannot take is refused."""
    torch.manual_seed(0)
    w = quantize_int8(torch.randn(48, 256) * torch.logspace(-2, 2, 256), group)
    assert torch.equal(native.int8_to_bf16(w.q, w.scale, group), w.dequantize(torch.bfloat16))
    part = slice(16, 48)
    assert torch.equal(native.int8_to_bf16(w.q[part], w.scale[part], group), w.dequantize(torch.bfloat16, part))
    eights = torch.ones(48, 256 // 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        native.int8_to_bf16(w.q, eights, 8)
