"""The decode step of a whole model in one native call (`tpo_decode` in kernels/native/cpu_kernels.c).

A decode step of gemma3:270m runs ~1000 torch operators and kernel calls of a few microseconds each:
on two cores that dispatch costs about as much as reading the weights. Where every linear layer of a
Llama-family or Gemma 3 model is int4 in the native layout, one token of one sequence over a
contiguous KV cache (tp_ollama.engine.kv_cache) goes through all layers in one call; the embedding,
the final norm and the LM head stay torch modules.

The native step computes what the torch modules compute, operation by operation, rounding to bfloat16
where they round (tests/models/test_native_decode.py holds the two paths together). It does not
apply to batches, paged caches, sharded models (their collectives run in module hooks), int8 or
float weights: those take the modules as before. TP_OLLAMA_NATIVE_DECODE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
from torch import nn

from tp_ollama.kernels import native
from tp_ollama.kernels.linear import QuantLinear
from tp_ollama.kernels.quant import Int4Weight, native_int4

ENV_SWITCH = "TP_OLLAMA_NATIVE_DECODE"
_ptr, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class _Linear(ctypes.Structure):
    _fields_ = [
        ("packed", _ptr),
        ("scale_zero", _ptr),
        ("ld_sz", _i64),
        ("n", _i64),
        ("k", _i64),
        ("group", _i64),
        ("bias", _ptr),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("input_norm", _ptr),
        ("pre_ffn_norm", _ptr),
        ("post_attn_norm", _ptr),
        ("post_ffn_norm", _ptr),
        ("q_norm", _ptr),
        ("k_norm", _ptr),
        ("inv_freq", _ptr),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
        ("cache_pos", _ptr),
        ("capacity", _i64),
    ]


class _Decoder(ctypes.Structure):
    _fields_ = [
        ("n_layers", _i64),
        ("hidden", _i64),
        ("n_q", _i64),
        ("n_kv", _i64),
        ("head_dim", _i64),
        ("intermediate", _i64),
        ("eps", _f32),
        ("attn_scale", _f32),
        ("bf16", _int),
        ("norm_unit_offset", _int),
        ("gelu", _int),
        ("layers", ctypes.POINTER(_Layer)),
    ]


def _int4(module: nn.Module | None) -> Int4Weight | None:
    if isinstance(module, QuantLinear) and isinstance(module.qweight, Int4Weight):
        return module.qweight
    return None


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs or m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


class NativeDecoder:
    """The model's layers described for `tpo_decode`: weight pointers taken once (the decoder keeps
    every tensor it points into alive), cache pointers taken once per KV cache."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        cfg: Any = model.config
        body: Any = model.model
        self.model = model
        self.gemma = cfg.family == "gemma3"
        self.dtype: torch.dtype = body.norm.weight.dtype
        self._keep: list[torch.Tensor] = []
        self._fn = lib.tpo_decode
        layers = list(body.layers)
        attn0 = layers[0].self_attn
        hd = attn0.head_dim
        sizes = attn0.fused_sizes
        self.hidden = int(cfg.hidden_size)
        self.layers = (_Layer * len(layers))()
        for i, block in enumerate(layers):
            self._describe(block, self.layers[i], body)
        self.decoder = _Decoder(
            n_layers=len(layers),
            hidden=self.hidden,
            n_q=sizes[0] // hd,
            n_kv=sizes[1] // hd,
            head_dim=hd,
            intermediate=layers[0].mlp.fused_sizes[0],
            eps=float(layers[0].input_layernorm.eps),
            attn_scale=float(attn0.scale),
            bf16=int(self.dtype == torch.bfloat16),
            norm_unit_offset=int(self.gemma),
            gelu=int(self.gemma),
            layers=self.layers,
        )
        self._cache: Any = None
        self._embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=self.dtype) if self.gemma else None

    def _vector(self, t: torch.Tensor | None, offset: bool = False) -> int | None:
        """A float32 copy of a norm scale (1 + w for Gemma) or bias, in the activation dtype's values."""
        if t is None:
            return None
        v = t.detach().float()
        v = (1.0 + v) if offset else v.to(self.dtype).float()
        v = v.contiguous()
        self._keep.append(v)
        return v.data_ptr()

    def _linear(self, w: Int4Weight, bias: torch.Tensor | None) -> _Linear:
        self._keep += [w.packed, w.scale_zero]
        n, k = w.shape
        return _Linear(
            packed=w.packed.data_ptr(),
            scale_zero=w.scale_zero.data_ptr(),
            ld_sz=w.scale_zero.stride(0) // 2,
            n=n,
            k=k,
            group=w.group,
            bias=self._vector(bias),
        )

    def _norm(self, norm: nn.Module | None) -> int | None:
        return None if norm is None else self._vector(norm.weight, offset=self.gemma)  # type: ignore[arg-type]

    def _describe(self, block: Any, out: _Layer, body: Any) -> None:
        attn, mlp = block.self_attn, block.mlp
        out.qkv = self._linear(attn.fused.qweight, attn.fused.bias)
        out.o = self._linear(attn.o_proj.qweight, attn.o_proj.bias)
        out.gate_up = self._linear(mlp.fused.qweight, mlp.fused.bias)
        out.down = self._linear(mlp.down_proj.qweight, mlp.down_proj.bias)
        out.input_norm = self._norm(block.input_layernorm)
        if self.gemma:
            out.pre_ffn_norm = self._norm(block.pre_feedforward_layernorm)
            out.post_attn_norm = self._norm(block.post_attention_layernorm)
            out.post_ffn_norm = self._norm(block.post_feedforward_layernorm)
            rotary = body.rotary_sliding if attn.window is not None else body.rotary_full
        else:
            out.pre_ffn_norm = self._norm(block.post_attention_layernorm)
            rotary = body.rotary
        out.q_norm = self._norm(attn.q_norm)
        out.k_norm = self._norm(attn.k_norm)
        inv_freq = rotary.inv_freq.float().contiguous()
        self._keep.append(inv_freq)
        out.inv_freq = inv_freq.data_ptr()

    def _bind(self, cache: Any) -> None:
        """Point the layers at this cache's tensors (a new cache comes with each generation)."""
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            layer.k_cache, layer.v_cache = kv.k.data_ptr(), kv.v.data_ptr()
            layer.cache_pos, layer.capacity = kv.pos.data_ptr(), kv.capacity
        self._cache = cache

    def fits(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> bool:
        """One token of one sequence on a contiguous cache of this model's dtype that holds exactly
        positions 0..pos-1 (the step attends over the first min(pos + 1, capacity) slots)."""
        if ids.shape != (1, 1) or ids.device.type != "cpu" or not hasattr(cache, "layers"):
            return False
        pos = int(positions[0, 0])
        if any(kv.used != min(pos, kv.capacity) for kv in cache.layers):
            return False
        return cache is self._cache or all(
            kv.k.dtype == self.dtype and kv.k.shape[0] == 1 and kv.k.is_contiguous() and kv.v.is_contiguous()
            for kv in cache.layers
        )

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """As model.hidden_states for one token where `fits`: (1, 1) ids and positions -> (1, 1, hidden)."""
        pos = int(positions[0, 0])
        if cache is not self._cache:
            self._bind(cache)
        body: Any = self.model.model
        x = body.embed_tokens(ids)
        if self._embed_scale is not None:
            x = x * self._embed_scale
        x = x.float().contiguous()
        rc = self._fn(ctypes.byref(self.decoder), x.data_ptr(), pos, torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"the native decode step failed (code {rc}) at position {pos}")
        for kv in cache.layers:
            kv.used = max(kv.used, pos % kv.capacity + 1)
        return body.norm(x.to(self.dtype))


def native_decoder(model: nn.Module) -> NativeDecoder | None:
    """The model's native decoder, made on first use; None where the native step does not apply."""
    found = model.__dict__.get("_native_decoder", False)
    if found is not False:
        return found
    decoder = _make(model)
    model.__dict__["_native_decoder"] = decoder
    return decoder


def _make(model: nn.Module) -> NativeDecoder | None:
    if os.environ.get(ENV_SWITCH, "1") == "0" or not native_int4():
        return None
    lib = native.library()
    cfg: Any = getattr(model, "config", None)
    body: Any = getattr(model, "model", None)
    if lib is None or cfg is None or body is None or cfg.family not in ("gemma3", "llama", "mistral", "qwen2", "qwen3"):
        return None
    dtype = body.norm.weight.dtype
    if dtype not in (torch.bfloat16, torch.float32) or body.norm.weight.device.type != "cpu" or _has_hooks(model):
        return None
    for block in body.layers:
        attn, mlp = block.self_attn, block.mlp
        unfused = getattr(attn, "fused_sizes", None) is None or getattr(mlp, "fused_sizes", None) is None
        if attn.kv_map is not None or unfused:
            return None
        weights = [_int4(attn.fused), _int4(attn.o_proj), _int4(mlp.fused), _int4(mlp.down_proj)]
        q, k, v = attn.fused_sizes
        gate, up = mlp.fused_sizes
        shapes = (q % attn.head_dim, k % attn.head_dim, q % max(k, 1), k - v, gate - up)
        if any(w is None for w in weights) or attn.head_dim > 1024 or attn.head_dim % 16 or any(shapes) or k == 0:
            return None
        norms = [block.input_layernorm, attn.q_norm, attn.k_norm]
        if any(n is not None and n.weight.dtype != dtype for n in norms):
            return None
        try:
            for w in weights:
                w.native_matmul()  # type: ignore[union-attr]  # checks the shapes the kernel takes
        except ValueError:
            return None
    return NativeDecoder(model, lib)
