"""A GGUF file seen as a Hugging Face checkpoint: metadata becomes a config.json-style dict, tensor
names become HF names, and the converters' transformations are undone on read (the Q/K row
permutation of llama-architecture files; Gemma norm weights stored with 1 added)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tp_ollama.checkpoints.base import Ensure, Range, check_range
from tp_ollama.checkpoints.gguf_file import GGUFFile
from tp_ollama.errors import CheckpointError
from tp_ollama.kernels import quant
from tp_ollama.kernels.gguf_pack import GROUP, INT4_TYPES, INT8_TYPES, int4_parts, int8_parts
from tp_ollama.kernels.gguf_quants import block_layout
from tp_ollama.kernels.quant import Int4Weight, Int8Weight, int4_fits, pack_int4_weight
from tp_ollama.models import config_from_hf

# GGUF architecture -> HF model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

# GGUF metadata suffix -> HF config key (prefixed by the architecture name in the file)
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
}

BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# ffn_norm is the pre-MLP norm: Llama calls it post_attention_layernorm, Gemma pre_feedforward_layernorm.
LLAMA_BLOCK_NAMES = {**BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"}
GEMMA_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    d: dict[str, Any] = {"model_type": ARCHITECTURES[arch]}
    for suffix, key in CONFIG_KEYS.items():
        if f"{arch}.{suffix}" in meta:
            d[key] = meta[f"{arch}.{suffix}"]
    if "head_dim" not in d and f"{arch}.rope.dimension_count" in meta:
        d["head_dim"] = meta[f"{arch}.rope.dimension_count"]
    d["vocab_size"] = tensors["token_embd.weight"].shape[0]
    d["tie_word_embeddings"] = "output.weight" not in tensors
    d["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    d["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(d.pop("rope_theta", 10000.0))}
    if scaling_type == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling_type not in (None, "none"):
        raise CheckpointError(f"{path}: rope scaling {scaling_type!r} is not supported; supported: linear")
    if arch == "gemma3":
        # llama.cpp's Gemma 3 conventions: every 6th layer global, local rope base 10k, and the
        # 27B model scales queries by hidden/heads instead of the head dim.
        d["sliding_window_pattern"] = 6
        d["rope_parameters"] = {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        head_dim = int(d.get("head_dim", 256))
        big = int(d["num_hidden_layers"]) == 62
        d["query_pre_attn_scalar"] = d["hidden_size"] // d["num_attention_heads"] if big else head_dim
    else:
        d["rope_parameters"] = rope
        d.pop("sliding_window", None)
    return d


class GGUFCheckpoint:
    format = "gguf"

    def __init__(self, path: Path, ensure: Ensure | None = None, identity: str | None = None) -> None:
        self.path = path
        self.identity = identity  # the file's digest when known: what caches key it by instead of its path
        self.file = GGUFFile(path, ensure)
        meta = dict(self.file.metadata)
        self.arch = meta.get("general.architecture")
        self.hf_config = hf_config_from_gguf(meta, dict(self.file.tensors), path)
        self.config = config_from_hf(self.hf_config, str(path))
        block_names = GEMMA_BLOCK_NAMES if self.arch == "gemma3" else LLAMA_BLOCK_NAMES
        self._to_gguf: dict[str, str] = {}
        for gname in self.file.tensors:
            hf = self._hf_name(gname, block_names)
            if hf is not None:
                self._to_gguf[hf] = gname
        # Fail on an unsupported tensor type now, before a tokenizer or any weight is read.
        self.file.check_types(self._to_gguf.values())

    @staticmethod
    def _hf_name(gname: str, block_names: dict[str, str]) -> str | None:
        m = _BLOCK.match(gname)
        if m:
            layer, part, kind = m.groups()
            return f"model.layers.{layer}.{block_names[part]}.{kind}" if part in block_names else None
        base, _, kind = gname.rpartition(".")
        return f"{TOP_NAMES[base]}.{kind}" if base in TOP_NAMES else None

    def names(self) -> set[str]:
        return set(self._to_gguf)

    def _gguf(self, name: str) -> str:
        if name not in self._to_gguf:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the GGUF file")
        return self._to_gguf[name]

    def stored_type(self, name: str) -> str:
        """The GGML type the file stores the tensor in (F32, Q8_0, Q4_K...)."""
        return str(self.file.tensors[self._gguf(name)].ggml_type)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.file.tensors[self._gguf(name)].shape)

    def read(self, name: str, dtype: torch.dtype, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        gname = self._gguf(name)
        shape = self.file.tensors[gname].shape
        check_range(self.path, name, shape[0], rows, "rows")
        t = self._read_cols(gname, rows, cols)
        if self.arch == "llama" and re.search(r"self_attn\.[qk]_proj\.", name):
            t = self._unpermute(name, t)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            t = t - 1.0  # stored as 1 + w; our RMSNorm multiplies by (1 + w) like transformers
        return t.to(dtype)

    def read_int4(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Int4Weight | None:
        """A Q4_0 / Q4_1 / Q4_K weight (or its rows / columns) packed as int4 of group 32 straight from
        its blocks, never dequantized: `read(name, ...)` up to bfloat16 rounding of scale and zero.
        None when it cannot be: another type, a 1-D tensor, columns not on block boundaries, or a
        selected shape the int4 kernel does not take; the caller then reads floats."""
        found = self._blocks_of(name, INT4_TYPES, rows, cols)
        if found is None:
            return None
        gname, info = found
        block, _ = block_layout(info.ggml_type)
        r0, r1 = rows if rows is not None else (0, info.shape[0])
        c0, c1 = cols if cols is not None else (0, info.shape[1])
        if c0 % block or c1 % block or not int4_fits((r1 - r0, c1 - c0), GROUP):
            return None
        codes, scale, zero = int4_parts(self.file.read_raw(gname, rows=rows, cols=cols), info.ggml_type)
        if self.arch == "llama" and re.search(r"self_attn\.[qk]_proj\.", name):
            # The same per-head row order as `read`: rows of the codes, columns of the (G, N) scales.
            codes = self._unpermute(name, codes)
            scale = self._unpermute(name, scale.t()).t()
            zero = self._unpermute(name, zero.t()).t()
        return pack_int4_weight(codes, scale, zero, GROUP)

    def read_int8(self, name: str, rows: Range | None = None, cols: Range | None = None) -> Int8Weight | None:
        """A Q8_0 / Q5_0 / Q4_0 / Q6_K weight (or its rows / columns) as int8 codes with the file's
        own scales per (sub-)block: `read(name, ...)` exactly. None when it cannot be: another type, a
        1-D tensor, columns not on (sub-)block boundaries, or a machine where int8 weights take one
        scale per row (no native kernel); the caller then reads floats. In plain rows: the caller
        puts the whole weight in the kernel's layout (quant.int8_blocks)."""
        found = self._blocks_of(name, INT8_TYPES, rows, cols)
        if found is None or quant.int8_group(found[1].shape[1]) != quant.INT8_GROUP:
            return None
        gname, info = found
        block, _ = block_layout(info.ggml_type)
        c0, c1 = cols if cols is not None else (0, info.shape[1])
        a, b = c0 // block * block, -(-c1 // block) * block  # the enclosing blocks
        codes, scale, group = int8_parts(self.file.read_raw(gname, rows=rows, cols=(a, b)), info.ggml_type)
        if (c0 - a) % group or (c1 - a) % group:
            return None
        codes = codes[:, c0 - a : c1 - a]
        scale = scale[:, (c0 - a) // group : (c1 - a) // group]
        if self.arch == "llama" and re.search(r"self_attn\.[qk]_proj\.", name):
            codes, scale = self._unpermute(name, codes), self._unpermute(name, scale)  # rows, as `read`
        return Int8Weight(codes.contiguous(), scale.contiguous(), group)

    def _blocks_of(
        self, name: str, types: frozenset[str], rows: Range | None, cols: Range | None
    ) -> tuple[str, Any] | None:
        """(GGUF name, tensor info) of a 2-D tensor of one of `types`, its row and column ranges
        checked; None for another type or shape."""
        gname = self._gguf(name)
        info = self.file.tensors[gname]
        if info.ggml_type not in types or len(info.shape) != 2:
            return None
        check_range(self.path, name, info.shape[0], rows, "rows")
        if cols is not None:
            check_range(self.path, gname, info.shape[1], cols, "columns")
        return gname, info

    def _read_cols(self, gname: str, rows: Range | None, cols: Range | None) -> torch.Tensor:
        """Quantized rows can only be cut at block boundaries: read the enclosing blocks, then narrow."""
        if cols is None:
            return self.file.read(gname, rows=rows, dtype=torch.float32)
        info = self.file.tensors[gname]
        check_range(self.path, gname, info.shape[-1], cols, "columns")
        block, _ = block_layout(info.ggml_type)
        a, b = cols[0] // block * block, min(-(-cols[1] // block) * block, info.shape[-1])
        t = self.file.read(gname, rows=rows, cols=(a, b), dtype=torch.float32)
        return t[:, cols[0] - a : cols[1] - a].contiguous() if (a, b) != cols else t

    def _unpermute(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Undo convert_hf_to_gguf's per-head interleave of rotary halves; works on any head-aligned
        row range because the permutation never crosses a head."""
        head_dim = self.config.head_dim
        if t.shape[0] % head_dim:
            raise CheckpointError(f"{self.path}: rows of {name} must be read in whole heads of {head_dim}")
        n = t.shape[0] // head_dim
        return t.reshape(n, head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    def extra_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if "rope_freqs.weight" in self.file.tensors:
            return {"rope_freqs": self.file.read("rope_freqs.weight", dtype=torch.float32)}
        return {}

    def model_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.file.metadata.items() if not k.startswith("tokenizer.ggml.")}

    def close(self) -> None:
        self.file.close()


__all__ = ["GGUFCheckpoint", "hf_config_from_gguf"]
