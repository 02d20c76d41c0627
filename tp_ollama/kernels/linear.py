"""Modules that hold quantized weights: a linear layer and an embedding that doubles as the tied LM
head. They replace nn.Linear / Embedding after a tensor-parallel plan has cut the shapes, and take
over the replaced module's hooks, so the plan's collectives still run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tp_ollama.kernels.quant import Int4Weight, Int8Weight, QuantWeight, quant_matmul


class _QuantHolder(nn.Module):
    """Registers a QuantWeight's tensors as buffers (so .to() and memory accounting see them); the
    weight object over them is rebuilt only when they move (it is read every step). Scales are held
    as integer views of their bits: a model's .to(dtype) moves devices but leaves them as the kernels
    read them (float32 int8 scales, bfloat16 int4 pairs), never rounded to the activation dtype."""

    q: torch.Tensor
    scale_bits: torch.Tensor
    packed: torch.Tensor
    scale_zero_bits: torch.Tensor

    def _hold(self, weight: QuantWeight) -> None:
        self.kind = weight.kind
        self.group = weight.group
        self.blocked = getattr(weight, "blocked", False)
        if isinstance(weight, Int8Weight):
            self.register_buffer("q", weight.q, persistent=False)
            self.register_buffer("scale_bits", weight.scale.view(torch.int32), persistent=False)
        else:
            self.register_buffer("packed", weight.packed, persistent=False)
            self.register_buffer("scale_zero_bits", weight.scale_zero.view(torch.int16), persistent=False)
        self._rebuild()

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    @property
    def scale_zero(self) -> torch.Tensor:
        return self.scale_zero_bits.view(torch.bfloat16)

    def _rebuild(self) -> None:
        if self.kind == "int8":
            self.qweight: QuantWeight = Int8Weight(self.q, self.scale, self.group, self.blocked)
        else:
            self.qweight = Int4Weight(self.packed, self.scale_zero, self.group)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        self._rebuild()
        return out

    def extra_repr(self) -> str:
        n, k = self.qweight.shape
        return f"{k} -> {n}, {self.kind}"


class QuantLinear(_QuantHolder):
    """head: an untied LM head (see quant_matmul)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None, head: bool = False) -> None:
        super().__init__()
        self._hold(weight)
        self.head = head
        # A buffer, not a parameter: it was read with the weight and is not read again.
        self.bias: torch.Tensor | None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self.qweight, head=self.head)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantEmbedding(_QuantHolder):
    """Lookups dequantize only the rows asked for; `project` is the tied LM head on the packed kernel."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self._hold(weight)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids, self.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.qweight, head=True)


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def take_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give `new` the hooks a tensor-parallel plan registered on `old`."""
    for attr in _HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
    return new


def out_features(linear: nn.Module) -> int:
    """Local output size of a (maybe sharded, maybe quantized) linear layer, from its tensors."""
    if isinstance(linear, _QuantHolder):
        return linear.qweight.shape[0]
    weight: torch.Tensor = linear.weight  # type: ignore[assignment]
    return int(weight.shape[0])


def model_bytes(model: nn.Module) -> int:
    """Bytes of weights held, each byte once: fused layers and their parts share storage (a part's
    int4 scales are a strided view into the fused layer's), and a shard read from a mapped file is a
    slice of the whole tensor's storage, of which only the slice counts."""
    spans: dict[int, list[tuple[int, int]]] = {}
    strided: list[tuple[int, int, int, int]] = []  # storage, first byte, end, own bytes
    for t in [*model.parameters(), *model.buffers()]:
        nbytes = t.numel() * t.element_size()
        start = int(t.storage_offset()) * t.element_size()
        storage = t.untyped_storage().data_ptr()
        if t.is_contiguous():
            spans.setdefault(storage, []).append((start, start + int(nbytes)))
        elif nbytes:
            last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
            strided.append((storage, start, start + (last + 1) * t.element_size(), nbytes))
    total = 0
    merged: dict[int, list[tuple[int, int]]] = {}
    for storage, ranges in spans.items():
        for lo, hi in sorted(ranges):
            runs = merged.setdefault(storage, [])
            if runs and lo <= runs[-1][1]:
                total += max(0, hi - runs[-1][1])
                runs[-1] = (runs[-1][0], max(hi, runs[-1][1]))
            else:
                total += hi - lo
                runs.append((lo, hi))
    for storage, lo, hi, nbytes in strided:  # inside a counted range: a view of it; else its own elements
        if not any(a <= lo and hi <= b for a, b in merged.get(storage, [])):
            total += nbytes
    return total


def activation_like(model: nn.Module) -> torch.Tensor:
    """A tensor with the dtype and device activations (and the KV cache) use: the final norm's
    weight, which is never quantized (a pipeline stage without it: its first layer's norm)."""
    norm = getattr(model.model.norm, "weight", None)
    if norm is None:
        norm = next(p for name, p in model.named_parameters() if name.endswith("input_layernorm.weight"))
    return norm
