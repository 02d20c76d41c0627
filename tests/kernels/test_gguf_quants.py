"""tp_ollama.kernels.gguf_quants: GGML blocks dequantized bit for bit as gguf-py does, from strided views too
(whole files through GGUFFile: tests/checkpoints/test_gguf_file.py), and blocks of the wrong shape refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.checkpoints.test_gguf_file import COLS, QUANTIZABLE, RANDOM_BLOCKS, raw_tensor, reference
from tp_ollama.kernels import gguf_quants


@pytest.mark.parametrize("random_bytes", [False, True])
def test_dequantize_accepts_strided_blocks(random_bytes: bool) -> None:
    # A column slice of a row-major tensor reaches the kernels as a strided (rows, blocks, ts) view;
    # random bytes reach bit patterns (all high bits, extreme nibbles) that quantize rarely makes.
    for ggml_type in QUANTIZABLE + RANDOM_BLOCKS:
        raw = raw_tensor(ggml_type, (4, COLS), seed=7, random_bytes=random_bytes)
        block_size, type_size = gguf_quants.block_layout(ggml_type)
        blocks = torch.from_numpy(raw.view(np.uint8).copy()).unflatten(-1, (-1, type_size))[:, 1:]
        out = gguf_quants.dequantize(blocks, ggml_type).flatten(-2)
        assert torch.equal(out, reference(raw, ggml_type)[:, block_size:]), ggml_type


def test_block_layouts_are_ggmls():
    assert gguf_quants.block_layout("F32") == (1, 4)
    assert gguf_quants.block_layout("Q8_0") == (32, 34)
    assert gguf_quants.block_layout("Q4_K") == (256, 144)
    assert gguf_quants.block_layout("Q6_K") == (256, 210)
    assert set(QUANTIZABLE + RANDOM_BLOCKS) == set(gguf_quants.SUPPORTED_TYPES)


def test_blocks_of_another_size_or_dtype_are_refused_with_the_expected_shape():
    blocks = torch.zeros(2, 34, dtype=torch.uint8)
    assert gguf_quants.dequantize(blocks, "Q8_0").shape == (2, 32)
    with pytest.raises(ValueError, match=r"Q4_0 blocks must be uint8 \(\.\.\., 18\), got torch\.uint8 \[2, 34\]"):
        gguf_quants.dequantize(blocks, "Q4_0")
    with pytest.raises(ValueError, match=r"Q8_0 blocks must be uint8 \(\.\.\., 34\), got torch\.int8"):
        gguf_quants.dequantize(blocks.view(torch.int8), "Q8_0")
    _, q2_k_bytes = gguf_quants.block_layout("Q2_K")  # a type gguf-py knows that is not supported
    with pytest.raises(KeyError):
        gguf_quants.dequantize(torch.zeros(2, q2_k_bytes, dtype=torch.uint8), "Q2_K")


@pytest.mark.parametrize("random_bytes", [False, True])
@pytest.mark.parametrize("ggml_type", gguf_quants.SYMMETRIC_TYPES)
def test_symmetric_parts_multiply_to_the_dequantized_values(ggml_type: str, random_bytes: bool) -> None:
    """The codes and scales an int8 weight keeps (Q8_0, Q5_0, Q4_0 per block of 32, Q6_K per
    sub-block of 16): their product is gguf-py's dequantization bit for bit, the codes fit int8."""
    if random_bytes and ggml_type not in [*RANDOM_BLOCKS, "Q8_0", "Q4_0", "Q5_0"]:
        pytest.skip("not built from random bytes")
    if not random_bytes and ggml_type not in QUANTIZABLE:
        pytest.skip("gguf-py cannot quantize it")
    raw = raw_tensor(ggml_type, (4, COLS), seed=3, random_bytes=random_bytes)
    _, type_size = gguf_quants.block_layout(ggml_type)
    blocks = torch.from_numpy(raw.view(np.uint8).copy()).unflatten(-1, (-1, type_size))
    codes, scale = gguf_quants.symmetric_parts(blocks, ggml_type)
    group = {"Q6_K": 16}.get(ggml_type, 32)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert codes.shape[-1] == scale.shape[-1] * group
    n, b = codes.shape[:2]
    product = (codes.float().view(n, b, -1, group) * scale[..., None]).flatten(1)
    assert torch.equal(product, reference(raw, ggml_type))
