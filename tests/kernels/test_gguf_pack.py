"""GGUF Q4_0 / Q4_1 / Q4_K blocks repacked as int4 (group 32) without dequantizing: the codes are the
file's codes, the float32 scale / zero reproduce gguf-py's dequantization, the packed (bfloat16) weight
is within the rounding of its scale and zero, and GGUFCheckpoint.read_int4 agrees with read.

Error bound of the packed weight, per element: 8 |scale| 2^-8 + |zero| 2^-8. bfloat16 keeps 8
significant bits, so rounding moves scale and zero by less than 2^-8 of themselves, and with the zero
computed from the unrounded scale the packed weight is off by (q - 8) * d(scale) + d(zero), |q - 8| <= 8.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tp_ollama.checkpoints.gguf_checkpoint import GGUFCheckpoint
from tp_ollama.checkpoints.gguf_file import GGUFFile
from tp_ollama.errors import CheckpointError
from tp_ollama.kernels import gguf_quants, quant
from tp_ollama.kernels.gguf_pack import INT4_TYPES, blocks_to_int4, int4_parts
from tp_ollama.kernels.quant import Int4Weight

TYPES = ["Q4_0", "Q4_1", "Q4_K"]
QS_AT = {"Q4_0": 2, "Q4_1": 4, "Q4_K": 16}  # byte offset of the packed nibbles in a block
F32_SLACK = 2.0**-22  # relative float32 rounding of the (q - 8) * scale + zero reconstruction


def quantized(ggml_type: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(N, bytes per row) uint8 blocks. gguf-py quantizes Q4_0 / Q4_1 from normal values; it cannot
    quantize Q4_K, whose blocks are random bytes with f16 d / dmin of realistic size (either sign)."""
    rng = np.random.default_rng(seed)
    if ggml_type != "Q4_K":
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), Q[ggml_type])
    block_size, type_size = gguf_quants.block_layout(ggml_type)
    n, n_blocks = shape[0], shape[1] // block_size
    raw = rng.integers(0, 256, (n, n_blocks, type_size), dtype=np.uint8)
    raw[..., 0:4] = rng.uniform(-0.05, 0.05, (n, n_blocks, 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, n_blocks * type_size)


def blocks(raw: np.ndarray, ggml_type: str) -> torch.Tensor:
    _, type_size = gguf_quants.block_layout(ggml_type)
    return torch.from_numpy(raw.copy()).view(raw.shape[0], -1, type_size)


def file_codes(raw: np.ndarray, ggml_type: str) -> torch.Tensor:
    """The 4-bit values in element order, read from the bytes as the GGML spec lays them out: Q4_0 /
    Q4_1 elements 0-15 in the low nibbles of the 16 bytes, 16-31 in the high ones; Q4_K four runs of
    32 bytes, run r holding sub-block 2r in its low nibbles and 2r + 1 in its high ones."""
    b = blocks(raw, ggml_type).numpy()
    at = QS_AT[ggml_type]
    if ggml_type == "Q4_K":
        qs = b[..., at : at + 128].reshape(*b.shape[:2], 4, 1, 32)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-2)  # (N, blocks, 4, 2, 32)
    else:
        qs = b[..., at : at + 16]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, blocks, 32)
    return torch.from_numpy(codes.reshape(b.shape[0], -1))


def reference(raw: np.ndarray, ggml_type: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, Q[ggml_type])))


def per_element(t: torch.Tensor) -> torch.Tensor:
    """(K/32, N) per-group values -> (N, K)."""
    return t.t().repeat_interleave(32, dim=1)


def reconstruct(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - 8.0) * per_element(scale) + per_element(zero)


def bf16_bound(scale: torch.Tensor, zero: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N, K): 8 |scale| 2^-8 + |zero| 2^-8, plus float32 rounding of the reconstruction."""
    return (8.0 * per_element(scale).abs() + per_element(zero).abs()) * 2.0**-8 + ref.abs() * F32_SLACK


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> float:
    err = (got - ref).abs()
    worst = float((err / bound.clamp_min(torch.finfo(torch.float32).tiny)).max())
    assert bool((err <= bound).all()), f"{what}: max abs error {float(err.max()):.3g}, {worst:.3f} of the bound"
    return float(err.max())


@pytest.mark.parametrize("ggml_type", TYPES)
def test_parts_are_the_file_codes_and_reproduce_gguf(ggml_type: str) -> None:
    raw = quantized(ggml_type, (64, 512), seed=1)
    ref = reference(raw, ggml_type)
    codes, scale, zero = int4_parts(blocks(raw, ggml_type), ggml_type)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 512)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == zero.shape == (16, 64)
    assert torch.equal(codes, file_codes(raw, ggml_type))
    got = reconstruct(codes, scale, zero)
    if ggml_type == "Q4_0":
        # d * (q - 8) + 0: the same single product gguf computes.
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    else:
        # Not bit-exact in general: gguf computes d * q + m, one rounding; we compute zero = m + 8 d
        # first and then (q - 8) d + zero. When m + 8 d is exact (its terms of similar magnitude) both
        # round the same exact value, but a block whose d and m differ greatly rounds twice.
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_packed_weight_within_bf16_rounding(ggml_type: str) -> None:
    raw = quantized(ggml_type, (128, 768), seed=2)
    ref = reference(raw, ggml_type)
    codes, scale, zero = int4_parts(blocks(raw, ggml_type), ggml_type)
    w = blocks_to_int4(blocks(raw, ggml_type), ggml_type)
    assert isinstance(w, Int4Weight) and w.group == 32 and w.shape == (128, 768)
    assert torch.equal(w.codes(), codes)
    assert_within(w.dequantize(), ref, bf16_bound(scale, zero, ref), f"{ggml_type} packed vs gguf")


def test_other_types_and_shapes_are_refused() -> None:
    q8 = gguf.quants.quantize(np.ones((32, 64), np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="Q8_0"):
        blocks_to_int4(blocks(q8, "Q8_0"), "Q8_0")
    with pytest.raises(ValueError, match=r"Q4_0.*\(16, 64\)"):
        blocks_to_int4(blocks(quantized("Q4_0", (16, 64)), "Q4_0"), "Q4_0")
    with pytest.raises(ValueError, match="Q4_1 blocks must be uint8"):
        blocks_to_int4(blocks(quantized("Q4_0", (32, 64)), "Q4_0"), "Q4_1")  # 18-byte blocks, not 20
    assert frozenset(TYPES) == INT4_TYPES


# --- through the file -------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 512, 4, 2, 128, 512


def write_llama(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """A llama-architecture GGUF whose layer i holds 4-bit type TYPES[i], plus a Q8_0 v_proj; returns
    the raw tensors by GGUF name."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(len(TYPES))
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    tensors: dict[str, tuple[str, np.ndarray]] = {
        "token_embd.weight": ("F32", np.random.default_rng(0).standard_normal((64, HIDDEN)).astype(np.float32)),
        "output_norm.weight": ("F32", np.ones(HIDDEN, np.float32)),
    }
    for i, t in enumerate(TYPES):
        tensors[f"blk.{i}.attn_q.weight"] = (t, quantized(t, (HEADS * HEAD_DIM, HIDDEN), seed=10 * i))
        tensors[f"blk.{i}.attn_k.weight"] = (t, quantized(t, (KV_HEADS * HEAD_DIM, HIDDEN), seed=10 * i + 1))
        tensors[f"blk.{i}.ffn_up.weight"] = (t, quantized(t, (FFN, HIDDEN), seed=10 * i + 2))
        v = np.random.default_rng(i).standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
        tensors[f"blk.{i}.attn_v.weight"] = ("Q8_0", gguf.quants.quantize(v, Q.Q8_0))
    for name, (t, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=None if t == "F32" else Q[t])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, np.ndarray]]]:
    path = tmp_path_factory.mktemp("pack") / "llama.gguf"
    return path, write_llama(path)


def test_read_raw_copies_only_the_selected_blocks(llama_file: tuple[Path, dict[str, tuple[str, np.ndarray]]]) -> None:
    path, tensors = llama_file
    _, raw = tensors["blk.2.ffn_up.weight"]
    with GGUFFile(path) as f:
        out = f.read_raw("blk.2.ffn_up.weight", rows=(3, 40), cols=(256, 512))
        assert out.dtype == torch.uint8 and out.shape == (37, 1, 144) and out.is_contiguous()
        assert torch.equal(out, blocks(raw, "Q4_K")[3:40, 1:2])
        assert torch.equal(f.read_raw("blk.0.attn_v.weight"), blocks(tensors["blk.0.attn_v.weight"][1], "Q8_0"))
        with pytest.raises(CheckpointError, match=r"cols 32:256 of tensor blk\.2\.ffn_up\.weight.*block size 256"):
            f.read_raw("blk.2.ffn_up.weight", cols=(32, 256))
        with pytest.raises(CheckpointError, match=r"rows 0:600 of tensor blk\.0\.ffn_up\.weight is outside 0:512"):
            f.read_raw("blk.0.ffn_up.weight", rows=(0, 600))
        with pytest.raises(CheckpointError, match=r"output_norm\.weight.*only 2-D"):
            f.read_raw("output_norm.weight")


def int4_bound(w: Int4Weight, ref: torch.Tensor) -> torch.Tensor:
    """The bf16 bound from the packed (rounded) scale and zero: |x| <= |bf16(x)| (1 + 2^-7)."""
    sz = w.scale_zero.float() * (1.0 + 2.0**-7)
    return bf16_bound(sz[..., 0], sz[..., 1], ref)


@pytest.mark.parametrize("layer", range(len(TYPES)))
def test_read_int4_slices_and_refusals(llama_file: tuple[Path, dict[str, tuple[str, np.ndarray]]], layer: int) -> None:
    path, _ = llama_file
    ckpt = GGUFCheckpoint(path)
    try:
        up = f"model.layers.{layer}.mlp.up_proj.weight"
        full = ckpt.read_int4(up)
        assert full is not None and full.shape == (FFN, HIDDEN)
        assert_within(full.dequantize(), ckpt.read(up, torch.float32), int4_bound(full, full.dequantize()), up)
        rows, cols = (64, 192), (256, 512)  # block-aligned for every type, Q4_K's 256 included
        part = ckpt.read_int4(up, rows=rows, cols=cols)
        assert part is not None and part.shape == (128, 256)
        assert torch.equal(part.codes(), full.codes()[64:192, 256:512])
        assert torch.equal(part.scale_zero, full.scale_zero[8:16, 64:192])
        assert ckpt.read_int4(up, cols=(16, 272)) is None  # not on block boundaries
        assert ckpt.read_int4(up, rows=(0, 48)) is None  # 48 rows: not whole tiles of INT4_TILE
        if TYPES[layer] == "Q4_K":
            assert ckpt.read_int4(up, cols=(32, 288)) is None  # 32-aligned, but not on 256-blocks
        else:
            assert ckpt.read_int4(up, cols=(32, 288)) is not None
        assert ckpt.read_int4(f"model.layers.{layer}.self_attn.v_proj.weight") is None  # Q8_0
        assert ckpt.read_int4("model.norm.weight") is None  # F32, 1-D
    finally:
        ckpt.close()


def test_read_int8_keeps_the_files_values_and_refuses_the_rest(
    llama_file: tuple[Path, dict[str, tuple[str, np.ndarray]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Q8_0 tensor read as int8 is `read`'s float32 values exactly, with the file's codes and its
    block scales (group 32); slices on group boundaries are slices of the whole; anything else is
    refused (None), and so is every tensor where int8 weights take one scale per row."""
    path, tensors = llama_file
    monkeypatch.setattr(quant, "int8_group", lambda k: quant.INT8_GROUP)  # as where the native kernel runs
    ckpt = GGUFCheckpoint(path)
    try:
        v = "model.layers.1.self_attn.v_proj.weight"
        full = ckpt.read_int8(v)
        assert full is not None and full.group == 32 and full.shape == (KV_HEADS * HEAD_DIM, HIDDEN)
        assert torch.equal(full.dequantize(), ckpt.read(v, torch.float32))
        b = blocks(tensors["blk.1.attn_v.weight"][1], "Q8_0")
        assert torch.equal(full.q, b[..., 2:].contiguous().view(torch.int8).flatten(1))
        part = ckpt.read_int8(v, rows=(8, 72), cols=(64, 192))
        assert part is not None
        assert torch.equal(part.q, full.q[8:72, 64:192]) and torch.equal(part.scale, full.scale[8:72, 2:6])
        assert ckpt.read_int8(v, cols=(16, 272)) is None  # not on group boundaries
        up = "model.layers.0.mlp.up_proj.weight"  # Q4_0, symmetric too (read as int8 under --quant int8)
        up8 = ckpt.read_int8(up)
        assert up8 is not None and torch.equal(up8.dequantize(), ckpt.read(up, torch.float32))
        assert ckpt.read_int8("model.norm.weight") is None  # F32, 1-D
        q = "model.layers.1.self_attn.q_proj.weight"  # Q4_1: asymmetric, not kept as int8
        assert ckpt.read_int8(q) is None
        monkeypatch.setattr(quant, "int8_group", lambda k: k)  # torch's kernels: one scale per row
        assert ckpt.read_int8(v) is None
    finally:
        ckpt.close()


@pytest.mark.parametrize("layer", range(len(TYPES)))
def test_read_int4_unpermutes_llama_q_and_k_like_read(
    llama_file: tuple[Path, dict[str, tuple[str, np.ndarray]]], layer: int
) -> None:
    path, _ = llama_file
    ckpt = GGUFCheckpoint(path)
    try:
        for proj, rows in (("q_proj", None), ("q_proj", (128, 384)), ("k_proj", (128, 256))):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            w = ckpt.read_int4(name, rows=rows)
            assert w is not None
            ref = ckpt.read(name, torch.float32, rows=rows)
            assert_within(w.dequantize(), ref, int4_bound(w, ref), f"{TYPES[layer]} {name} rows {rows}")
        # The permutation is not the identity, so this also checks it was applied to the codes.
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        raw_order = int4_parts(ckpt.file.read_raw(f"blk.{layer}.attn_q.weight"), TYPES[layer])[0]
        w = ckpt.read_int4(q)
        assert w is not None and not torch.equal(w.codes(), raw_order)
    finally:
        ckpt.close()
