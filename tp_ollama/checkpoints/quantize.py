"""Which weights to quantize, and reading them straight into their packing.

Runs inside load_model after a tensor-parallel plan has cut the shapes: each linear layer (and the
token embedding, which is also the tied LM head) is read one tensor at a time, only this rank's
slice, packed, and swapped in for the float module; nothing else of the model exists in float32 then.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tp_ollama.checkpoints.base import Checkpoint, Range
from tp_ollama.config.settings import QUANT_MODES, default_cache_dir
from tp_ollama.errors import ConfigError
from tp_ollama.kernels import hugepages
from tp_ollama.kernels.linear import QuantEmbedding, QuantLinear, activation_like, take_over
from tp_ollama.kernels.native import BLOCK_ROWS
from tp_ollama.kernels.packed_cache import PackedCache, cache_key
from tp_ollama.kernels.quant import (
    SCALE_DTYPE,
    Int4Weight,
    Int8Weight,
    QuantWeight,
    int4_fits,
    int8_blocks,
    int8_group,
    int8_scales,
    quantize_int4,
    quantize_int8,
)
from tp_ollama.models.common import Embedding

log = logging.getLogger(__name__)

INT4_GROUP = 32
READ_CHUNK_ELEMENTS = 1 << 24  # float32 values of one weight read and packed at a time (64 MiB)
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


def auto_packings(ckpt: Checkpoint) -> dict[str, tuple[str, int]]:
    """What `--quant auto` makes of each 2-D weight, by module path: (int4, 32), (int8, inputs per
    scale) or nothing (float), as the cost model takes them (tp_ollama.parallel.costmodel.Packings)."""
    from tp_ollama.kernels.gguf_quants import SYMMETRIC_TYPES, symmetric_group

    stored_type = getattr(ckpt, "stored_type", None)
    out: dict[str, tuple[str, int]] = {}
    if stored_type is None:
        return out
    for name in ckpt.names():
        if not name.endswith(".weight") or len(ckpt.shape(name)) != 2:
            continue
        kind = stored_type(name)
        packing = packing_for("auto", kind)
        if packing == "int4":
            out[name.removesuffix(".weight")] = ("int4", INT4_GROUP)
        elif packing == "int8":
            group = symmetric_group(kind) if kind in SYMMETRIC_TYPES else int8_group(ckpt.shape(name)[1])
            out[name.removesuffix(".weight")] = ("int8", group)
    return out


def param_slices(param: torch.Tensor) -> tuple[Range | None, Range | None]:
    """(rows, cols) of the checkpoint tensor that a (maybe sharded) parameter holds."""
    tp_slice = getattr(param, "tp_slice", None)  # (dim, start, end) set by a TP plan
    if tp_slice is None:
        return None, None
    dim, start, end = tp_slice
    return ((start, end), None) if dim == 0 else (None, (start, end))


def read_packed(
    ckpt: Checkpoint, name: str, param: torch.Tensor, packing: str, huge_pages: bool = False
) -> QuantWeight:
    """This rank's slice of a weight in `packing`: 4-bit GGUF blocks directly, anything else read
    as float32 a band of rows at a time and packed, so no more than READ_CHUNK_ELEMENTS floats of it
    exist at once (a 262k-token embedding would otherwise take 0.7 GB of float32 and more in temporaries).
    `huge_pages`: in 2 MiB pages (a CPU weight that decode streams), each byte copied there once."""
    rows, cols = param_slices(param)
    if packing == "int4":
        read_int4 = getattr(ckpt, "read_int4", None)
        direct = read_int4(name, rows, cols) if read_int4 is not None else None
        if direct is not None:
            return in_huge_pages(direct) if huge_pages else direct
    n_rows, n_cols = ckpt.shape(name)
    r0, r1 = rows if rows is not None else (0, n_rows)
    width = cols[1] - cols[0] if cols is not None else n_cols
    int4 = packing == "int4" and int4_fits((r1 - r0, width), INT4_GROUP)
    # Bands of whole 256-row units: whole int4 tiles, and whole heads for the Q/K row permutation.
    step = max(256, READ_CHUNK_ELEMENTS // max(n_cols, 1) // 256 * 256)
    bands = [(a, min(a + step, r1)) for a in range(r0, r1, step)]
    if len(bands) == 1:
        w = _pack_band(ckpt, name, bands[0], cols, int4, r1 - r0)
        return in_huge_pages(w) if huge_pages else w
    # Each band is copied into the whole weight (in 2 MiB pages in any case) as soon as it is packed,
    # so the packed bands never all exist beside it: a 262k-row embedding would double for a moment.
    whole: QuantWeight | None = None
    at = 0
    for band in bands:
        w = _pack_band(ckpt, name, band, cols, int4, r1 - r0)
        whole = whole if whole is not None else _empty_rows(w, r1 - r0)
        _put_rows(whole, w, at)
        at += w.shape[0]
    assert whole is not None
    return whole


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised memory for a weight: 2 MiB pages on the CPU (tp_ollama.kernels.hugepages)."""
    return hugepages.empty(shape, dtype) if device.type == "cpu" else torch.empty(shape, dtype=dtype, device=device)


def _empty_rows(like: QuantWeight, rows: int) -> QuantWeight:
    """A weight of `rows` rows packed as `like`, on its device, to be filled band by band."""
    k = like.shape[1]
    if isinstance(like, Int8Weight):
        device = like.q.device
        scale = _empty((rows, like.scale.shape[1]), torch.float32, device)
        return Int8Weight(_empty((rows, k), torch.int8, device), scale, like.group, like.blocked)
    device = like.packed.device
    scale_zero = _empty((like.scale_zero.shape[0], rows, 2), SCALE_DTYPE, device)
    return Int4Weight(_empty((rows, k // 2), torch.uint8, device), scale_zero, like.group)


def _put_rows(whole: QuantWeight, part: QuantWeight, at: int) -> None:
    """Rows at.. of `whole` from `part`, packed alike (int4 bands are whole tiles, blocked int8 bands
    whole blocks)."""
    n = part.shape[0]
    if (
        isinstance(whole, Int8Weight)
        and isinstance(part, Int8Weight)
        and (part.group, part.blocked) == (whole.group, whole.blocked)
    ):
        whole.q[at : at + n] = part.q
        whole.scale[at : at + n] = part.scale
    elif isinstance(whole, Int4Weight) and isinstance(part, Int4Weight) and part.group == whole.group:
        whole.packed[at : at + n] = part.packed
        whole.scale_zero[:, at : at + n] = part.scale_zero
    else:
        raise ValueError(f"cannot join a {part.kind} band of group {part.group} into a {whole.kind} weight")


def _pack_band(
    ckpt: Checkpoint, name: str, rows: Range, cols: Range | None, int4: bool, whole_rows: int
) -> QuantWeight:
    """One band of rows of a weight of whole_rows rows, packed as the whole will be."""
    if int4:
        return quantize_int4(ckpt.read(name, torch.float32, rows=rows, cols=cols), INT4_GROUP)
    return int8_blocks(_int8_band(ckpt, name, rows, cols), whole_rows)


def _int8_band(ckpt: Checkpoint, name: str, rows: Range, cols: Range | None) -> Int8Weight:
    """A band of rows as plain int8: the file's own codes where it has them."""
    read_int8 = getattr(ckpt, "read_int8", None)
    direct = read_int8(name, rows, cols) if read_int8 is not None else None
    if direct is not None:
        return direct
    w = ckpt.read(name, torch.float32, rows=rows, cols=cols)
    width = w.shape[1]
    if cols is not None and int8_group(width) == width:
        # One scale per row (torch's kernels): a row-parallel shard takes it from whole rows, so every
        # degree of parallelism holds the same codes. Groups never straddle a shard on the native
        # kernel: shards are group-aligned.
        whole = ckpt.read(name, torch.float32, rows=rows)
        return quantize_int8(w, width, int8_scales(whole, whole.shape[1]), blocks=False)
    return quantize_int8(w, blocks=False)


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """Bands of rows, top to bottom, as one weight (int4 bands are whole tiles)."""
    whole = _empty_rows(parts[0], sum(p.shape[0] for p in parts))
    at = 0
    for part in parts:
        _put_rows(whole, part, at)
        at += part.shape[0]
    return whole


def in_huge_pages(w: QuantWeight) -> QuantWeight:
    """A CPU weight's tensors copied into 2 MiB pages (a freshly packed one; cached ones load there)."""
    if isinstance(w, Int8Weight):
        return Int8Weight(hugepages.copy_of(w.q), hugepages.copy_of(w.scale), w.group, w.blocked)
    return Int4Weight(hugepages.copy_of(w.packed), hugepages.copy_of(w.scale_zero), w.group)


def quantize_modules(
    model: nn.Module,
    ckpt: Checkpoint,
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    cache_root: Path | None = None,
) -> dict[str, int]:
    """Swap every linear layer and the embedding for a quantized one where `mode` says so, from the
    packed-weights cache when it has this exact shard. Returns how many tensors went to each packing."""
    check_quant_mode(mode)
    if mode == "none":
        return {}
    stored_type = getattr(ckpt, "stored_type", None)
    plan: list[tuple[str, nn.Module, str]] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear | Embedding):
            packing = packing_for(mode, stored_type(f"{path}.weight") if stored_type is not None else None)
            if packing is not None:
                plan.append((path, module, packing))
    slices = [(p, k, getattr(m.weight, "tp_slice", None)) for p, m, k in plan]
    key = cache_key(ckpt.path, slices, mode, dtype, getattr(ckpt, "identity", None))
    cache = PackedCache(cache_root if cache_root is not None else default_cache_dir(), key)
    cached = cache.load() or {}
    weights: dict[str, QuantWeight] = {}
    counts: Counter[str] = Counter()
    for path, module, packing in plan:
        param: torch.Tensor = module.weight  # type: ignore[assignment]
        huge = device.type == "cpu"
        weight = cached.get(path) or read_packed(ckpt, f"{path}.weight", param, packing, huge_pages=huge)
        weights[path] = weight
        weight = weight.to(device)
        new: nn.Module
        if isinstance(module, Embedding):
            new = QuantEmbedding(weight, dtype)
        else:
            new = QuantLinear(weight, _read_bias(ckpt, path, module, dtype, device), head=path == "lm_head")
        model.set_submodule(path, take_over(module, new))
        counts[weight.kind] += 1
    if weights and len(cached) != len(weights):
        cache.save(weights)
    fuse_projections(model)
    log.info("quantized %s", ", ".join(f"{n} tensors to {k}" for k, n in sorted(counts.items())) or "nothing")
    return dict(counts)


# Layers that read the same input, fused into one matmul per step (one kernel call instead of three).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(model: nn.Module) -> int:
    """Give every module whose q/k/v (or gate/up) layers are quantized alike a `fused` layer holding
    them stacked; the parts become views into it, so no weight is held twice. Returns fusions made."""
    made = 0
    for module in list(model.modules()):  # a snapshot: fusing adds modules
        for names in FUSED_GROUPS:
            parts = [module._modules.get(n) for n in names]
            if not all(isinstance(p, QuantLinear) for p in parts):
                continue
            layers: list[QuantLinear] = parts  # type: ignore[assignment]
            weights = [p.qweight for p in layers]
            if len({(w.kind, w.group, getattr(w, "blocked", False)) for w in weights}) != 1:
                continue
            biases = [p.bias for p in layers]
            if any(b is None for b in biases) and not all(b is None for b in biases):
                continue
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # type: ignore[union-attr]
            fused = QuantLinear(concat(weights), bias)
            sizes = [w.shape[0] for w in weights]
            module.fused = fused
            setattr(module, "fused_sizes", tuple(sizes))  # noqa: B010 (a plain attribute of any module)
            start = 0
            for name, layer, size in zip(names, layers, sizes, strict=True):
                part = slice_rows(fused.qweight, start, start + size)
                module.set_submodule(name, take_over(layer, QuantLinear(part, layer.bias)))
                start += size
            made += 1
    return made


def slice_rows(w: QuantWeight, a: int, b: int) -> QuantWeight:
    """Rows a..b-1 of a weight as views (int4: a and b on tile boundaries; blocked int8 on block
    boundaries, else the rows are copied out in plain order)."""
    if isinstance(w, Int8Weight):
        if w.blocked and (a % BLOCK_ROWS or b % BLOCK_ROWS):
            q, scale = w.plain(torch.arange(a, b))
            return Int8Weight(q.contiguous(), scale.contiguous(), w.group)
        return Int8Weight(w.q[a:b], w.scale[a:b], w.group, w.blocked)
    return Int4Weight(w.packed[a:b], w.scale_zero[:, a:b], w.group)


def describe_precision(model: nn.Module) -> dict[str, Any]:
    """What a loaded model computes in: activation dtype and how many weight tensors of each kind."""
    kinds: Counter[str] = Counter()
    for path, module in model.named_modules():
        if path.endswith(".fused"):
            continue  # its parts are counted
        if isinstance(module, QuantLinear | QuantEmbedding):
            kinds[module.kind] += 1
        elif isinstance(module, nn.Linear | Embedding):
            kinds[str(module.weight.dtype).removeprefix("torch.")] += 1
    return {"dtype": str(activation_like(model).dtype).removeprefix("torch."), "weights": dict(sorted(kinds.items()))}


def precision_line(precision: dict[str, Any]) -> str:
    weights = ", ".join(f"{n} {kind}" for kind, n in precision["weights"].items())
    return f"activations {precision['dtype']}, weight tensors: {weights}"


def _read_bias(ckpt: Checkpoint, path: str, module: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if module.bias is None:
        return None
    rows, _ = param_slices(module.bias)
    return ckpt.read(f"{path}.bias", dtype, rows=rows).to(device)
