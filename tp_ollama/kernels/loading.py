"""Which weights to quantize, and reading them straight into their packing.

Runs inside load_model after a tensor-parallel plan has cut the shapes: each linear layer (and the
token embedding, which is also the tied LM head) is read one tensor at a time, only this rank's
slice, packed, and swapped in for the float module; nothing else of the model exists in float32 then.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from tp_ollama.checkpoints.base import Checkpoint, Range
from tp_ollama.config import QUANT_MODES
from tp_ollama.errors import ConfigError
from tp_ollama.kernels.linear import QuantEmbedding, QuantLinear, activation_dtype, take_over
from tp_ollama.kernels.quant import QuantWeight, int4_fits, int8_scale, quantize_int4, quantize_int8
from tp_ollama.models.common import Embedding

log = logging.getLogger(__name__)

INT4_GROUP = 32
# GGUF block types whose 4-bit codes the int4 packing keeps; other quantized types become int8.
INT4_SOURCE_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


def check_quant_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ConfigError(f"quant {mode!r} is not supported; expected one of {', '.join(QUANT_MODES)}")
    return mode


def packing_for(mode: str, stored_type: str | None) -> str | None:
    """int8, int4 or None (keep float) for one tensor. `auto` follows the file: 4-bit GGUF blocks
    stay 4-bit, other quantized blocks become int8, float tensors stay float."""
    if mode == "none":
        return None
    if mode in ("int8", "int4"):
        return mode
    if stored_type is None or stored_type.upper() in FLOAT_TYPES:
        return None
    return "int4" if stored_type in INT4_SOURCE_TYPES else "int8"


def param_slices(param: torch.Tensor) -> tuple[Range | None, Range | None]:
    """(rows, cols) of the checkpoint tensor that a (maybe sharded) parameter holds."""
    tp_slice = getattr(param, "tp_slice", None)  # (dim, start, end) set by a TP plan
    if tp_slice is None:
        return None, None
    dim, start, end = tp_slice
    return ((start, end), None) if dim == 0 else (None, (start, end))


def read_packed(ckpt: Checkpoint, name: str, param: torch.Tensor, packing: str) -> QuantWeight:
    rows, cols = param_slices(param)
    if packing == "int4":
        read_int4 = getattr(ckpt, "read_int4", None)
        direct = read_int4(name, rows, cols) if read_int4 is not None else None
        if direct is not None:
            return direct
    w = ckpt.read(name, torch.float32, rows=rows, cols=cols)  # this tensor's slice only
    if packing == "int4" and int4_fits(tuple(w.shape), INT4_GROUP):
        return quantize_int4(w, INT4_GROUP)
    if cols is not None:
        # A row-parallel shard takes its scales from whole rows, so every degree of parallelism
        # holds the same int8 codes (int4 groups never straddle a shard: shards are group-aligned).
        return quantize_int8(w, int8_scale(ckpt.read(name, torch.float32, rows=rows)))
    return quantize_int8(w)


def quantize_modules(
    model: nn.Module, ckpt: Checkpoint, mode: str, dtype: torch.dtype, device: torch.device
) -> dict[str, int]:
    """Swap every linear layer and the embedding for a quantized one where `mode` says so.
    Returns how many tensors went to each packing."""
    check_quant_mode(mode)
    counts: Counter[str] = Counter()
    if mode == "none":
        return dict(counts)
    stored_type = getattr(ckpt, "stored_type", None)
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear | Embedding):
            continue
        name = f"{path}.weight"
        packing = packing_for(mode, stored_type(name) if stored_type is not None else None)
        if packing is None:
            continue
        weight = read_packed(ckpt, name, module.weight, packing).to(device)
        new: nn.Module
        if isinstance(module, Embedding):
            new = QuantEmbedding(weight, dtype)
        else:
            new = QuantLinear(weight, _read_bias(ckpt, path, module, dtype, device))
        model.set_submodule(path, take_over(module, new))
        counts[weight.kind] += 1
    log.info("quantized %s", ", ".join(f"{n} tensors to {k}" for k, n in sorted(counts.items())) or "nothing")
    return dict(counts)


def describe_precision(model: nn.Module) -> dict[str, Any]:
    """What a loaded model computes in: activation dtype and how many weight tensors of each kind."""
    kinds: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear | QuantEmbedding):
            kinds[module.kind] += 1
        elif isinstance(module, nn.Linear | Embedding):
            kinds[str(module.weight.dtype).removeprefix("torch.")] += 1
    return {"dtype": str(activation_dtype(model)).removeprefix("torch."), "weights": dict(sorted(kinds.items()))}


def precision_line(precision: dict[str, Any]) -> str:
    weights = ", ".join(f"{n} {kind}" for kind, n in precision["weights"].items())
    return f"activations {precision['dtype']}, weight tensors: {weights}"


def _read_bias(ckpt: Checkpoint, path: str, module: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if module.bias is None:
        return None
    rows, _ = param_slices(module.bias)
    return ckpt.read(f"{path}.bias", dtype, rows=rows).to(device)
