"""tp_ollama.kernels.linear: the modules that hold packed weights compute the float layer of their dequantized
weights, rebuild the weight over their buffers when moved, take over a plan's hooks, and the helpers read
sizes from the tensors held (each byte of shared storage once)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tp_ollama.kernels.linear import QuantEmbedding, QuantLinear, model_bytes, out_features, take_over
from tp_ollama.kernels.quant import QuantWeight, int4_fits, quantize_int4, quantize_int8

N, K = 64, 128
KINDS = [
    "int8",
    pytest.param("int4", marks=pytest.mark.skipif(not int4_fits((N, K), 32), reason="no int4 layout here")),
]


def packed(kind: str, seed: int = 0) -> tuple[torch.Tensor, QuantWeight]:
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return w, quantize_int8(w) if kind == "int8" else quantize_int4(w)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("kind", KINDS)
def test_a_quant_linear_is_the_linear_of_its_dequantized_weight_plus_its_bias(kind: str):
    _, weight = packed(kind)
    bias = torch.randn(N)
    x = torch.randn(3, 5, K)
    with_bias, without = QuantLinear(weight, bias), QuantLinear(weight, None)
    got = with_bias(x)
    assert got.shape == (3, 5, N) and got.dtype == torch.float32
    # The kernels round activations (bfloat16, or int8 per group natively): within a few percent.
    assert relative_error(got, F.linear(x, weight.dequantize(), bias)) < 0.03
    assert torch.allclose(got - without(x), bias.expand_as(got), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_quant_embedding_reads_its_rows_and_projects_as_the_tied_head(kind: str):
    _, weight = packed(kind)
    embedding = QuantEmbedding(weight, torch.bfloat16)
    ids = torch.tensor([[0, 17, 63], [5, 5, 1]])
    rows = embedding(ids)
    assert rows.shape == (2, 3, K) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, weight.dequantize(torch.bfloat16)[ids])
    x = torch.randn(4, K)
    assert relative_error(embedding.project(x), F.linear(x, weight.dequantize())) < 0.03


def test_moving_a_holder_rebuilds_its_weight_over_the_moved_buffers():
    _, weight = packed("int8")
    layer = QuantLinear(weight, torch.zeros(N))
    assert layer.qweight.q is layer.q and layer.scale.dtype == torch.float32
    before = layer.scale.clone()
    layer.to(torch.bfloat16)  # floating buffers move (the bias), scales stay as the kernels read them
    assert layer.bias.dtype == torch.bfloat16
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, before)
    assert layer.qweight.scale.data_ptr() == layer.scale.data_ptr() and layer.qweight.q is layer.q
    assert layer.state_dict() == {}  # read with the checkpoint, never saved
    assert "128 -> 64, int8" in repr(layer)


def test_the_new_module_runs_the_hooks_a_plan_put_on_the_old_one():
    _, weight = packed("int8")
    old = nn.Linear(K, N, bias=False)
    calls: list[str] = []
    old.register_forward_pre_hook(lambda module, args: (torch.ones_like(args[0]),))
    old.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    new = take_over(old, QuantLinear(weight, None))
    out = new(torch.randn(2, K))
    assert calls == ["QuantLinear"]
    assert torch.equal(out, QuantLinear(weight, None)(torch.ones(2, K)))  # the pre-hook replaced the input


def test_out_features_is_the_local_size_of_a_float_sharded_or_packed_layer():
    linear = nn.Linear(K, N)
    assert out_features(linear) == N
    linear.weight = nn.Parameter(linear.weight.detach()[: N // 2])  # a rank's rows after sharding
    assert out_features(linear) == N // 2
    assert out_features(QuantLinear(packed("int8")[1], None)) == N


class Holder(nn.Module):
    def __init__(self, **tensors: Any) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


def test_model_bytes_counts_each_byte_of_shared_storage_once():
    whole = torch.zeros(8, 16)  # 512 bytes
    assert model_bytes(Holder(a=whole)) == 512
    assert model_bytes(Holder(a=whole, part=whole[2:4])) == 512  # a fused layer and its parts
    assert model_bytes(Holder(top=whole[:2], bottom=whole[6:])) == 2 * 2 * 16 * 4  # shards of a mapped file
    assert model_bytes(Holder(rows=whole[:4], overlap=whole[2:6])) == 6 * 16 * 4
    assert model_bytes(Holder(cols=whole[:, :4], other=torch.zeros(3, dtype=torch.int8))) == 8 * 4 * 4 + 3
