"""The C structs of the native decode step (`tpo_linear`, `tpo_layer`, `tpo_decoder` in
kernels/cpu_kernels.c) as ctypes declares them, and the check that both sides agree: the
library reports the layout its compiler gave the structs (`tpo_struct_layout`), and the decoder
(models/native_decode.py) is built only when every size and field offset matches."""

from __future__ import annotations

import ctypes

_ptr, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class TpoLinear(ctypes.Structure):
    _fields_ = [
        ("int8", _int),
        ("packed", _ptr),
        ("scale_zero", _ptr),
        ("ld_sz", _i64),
        ("n", _i64),
        ("k", _i64),
        ("group", _i64),
        ("bias", _ptr),
    ]


class TpoLayer(ctypes.Structure):
    _fields_ = [
        ("q", TpoLinear),
        ("k", TpoLinear),
        ("v", TpoLinear),
        ("o", TpoLinear),
        ("gate", TpoLinear),
        ("up", TpoLinear),
        ("down", TpoLinear),
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
        ("window", _i64),
    ]


class TpoDecoder(ctypes.Structure):
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
        ("layers", ctypes.POINTER(TpoLayer)),
        ("embed_kind", _int),
        ("embed", TpoLinear),
        ("embed_scale", _f32),
        ("final_norm", _ptr),
        ("head", TpoLinear),
        ("all_reduce", _ptr),
        ("reduce_ctx", _ptr),
        ("kv_first", _ptr),
    ]


# int all_reduce(void *ctx, float *x, int64_t n): sums x over the tensor-parallel group in place.
REDUCE_FN = ctypes.CFUNCTYPE(_int, _ptr, _ptr, _i64)


EMBED_QUANT, EMBED_F32, EMBED_BF16 = 0, 1, 2  # tpo_decoder.embed_kind


def binding_layout() -> list[int]:
    """The structs' layout as the ctypes binding declares it: tpo_struct_layout's order (the size of
    each struct, then its fields' offsets)."""
    out: list[int] = []
    for struct in (TpoLinear, TpoLayer, TpoDecoder):
        out.append(ctypes.sizeof(struct))
        out += [getattr(struct, field[0]).offset for field in struct._fields_]
    return out


def library_layout(lib: ctypes.CDLL) -> list[int]:
    """The structs' layout as the library was compiled (tpo_struct_layout)."""
    count = int(lib.tpo_struct_layout(None, 0))
    values = (ctypes.c_int64 * count)()
    lib.tpo_struct_layout(values, count)
    return list(values)
