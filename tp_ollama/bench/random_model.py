"""Hugging Face model directories with random weights of a real model's shapes: decode timing of
big models without downloading them (the time of a step depends on the shapes, not the values).

The directory holds:
  config.json         what tp_ollama.models builds for the shape's model_type;
  model.safetensors   every tensor the model reads, random, written one band of rows at a time so
                      that memory stays near one band however large the model;
  tokenizer.json      (+ tokenizer_config.json) a byte-level tokenizer of 258 ids (256 bytes, <bos>,
                      <eos>), when vocab_size allows, so that text front ends (`tp-ollama serve`)
                      can load the directory too. The engine itself (tp_ollama.checkpoints.loader,
                      tp_ollama.parallel.shard.load_shard) reads only config.json and the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.shapes import ModelShape

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BAND_ELEMENTS = 1 << 24  # random values made at a time (64 MiB of float32)
WEIGHT_STD = 0.02  # the usual HF init: activations stay finite through any number of random layers
BYTE_TOKENS = 256
BOS, EOS = "<bos>", "<eos>"
TOKENIZER_VOCAB = BYTE_TOKENS + 2


def tensor_shapes(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint name, shape) of every tensor the model reads, in HF naming and file order."""
    d, hd, q, kv, i = shape.hidden_size, shape.head_dim, shape.q_size, shape.kv_size, shape.intermediate_size
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, d))]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if shape.family == "gemma3":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for n in range(shape.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(f"{p}self_attn.q_proj.weight", (q, d)), (f"{p}self_attn.k_proj.weight", (kv, d))]
        out += [(f"{p}self_attn.v_proj.weight", (kv, d)), (f"{p}self_attn.o_proj.weight", (d, q))]
        if shape.qkv_bias:
            out += [(f"{p}self_attn.q_proj.bias", (q,)), (f"{p}self_attn.k_proj.bias", (kv,))]
            out += [(f"{p}self_attn.v_proj.bias", (kv,))]
        if shape.qk_norm:
            out += [(f"{p}self_attn.q_norm.weight", (hd,)), (f"{p}self_attn.k_norm.weight", (hd,))]
        out += [(f"{p}mlp.gate_proj.weight", (i, d)), (f"{p}mlp.up_proj.weight", (i, d))]
        out += [(f"{p}mlp.down_proj.weight", (d, i))]
        out += [(f"{p}{name}.weight", (d,)) for name in norms]
    out.append(("model.norm.weight", (d,)))
    if not shape.tie_word_embeddings:
        out.append(("lm_head.weight", (shape.vocab_size, d)))
    return out


def hf_config(shape: ModelShape, dtype: str, tokenizer: bool) -> dict[str, Any]:
    """config.json for the shape, with the settings the family's real configs use."""
    config: dict[str, Any] = {
        "model_type": shape.model_type,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if tokenizer:
        config |= {"bos_token_id": BYTE_TOKENS, "eos_token_id": BYTE_TOKENS + 1}
    if shape.family == "gemma3":
        config |= {
            "architectures": ["Gemma3ForCausalLM"],
            "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": shape.head_dim,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "max_position_embeddings": 32768,
            "hidden_activation": "gelu_pytorch_tanh",
        }
    else:
        architecture = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[shape.model_type]
        config |= {
            "architectures": [f"{architecture}ForCausalLM"],
            "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0,
            "max_position_embeddings": 8192,
            "hidden_act": "silu",
        }
    return config


def file_bytes(shape: ModelShape, dtype: str) -> int:
    """Bytes of the tensor data in model.safetensors (the header adds a few KB per layer)."""
    itemsize = TORCH_DTYPES[dtype].itemsize
    return sum(_numel(s) for _, s in tensor_shapes(shape)) * itemsize


def write_random_model(
    shape: ModelShape, directory: Path, dtype: str = "bfloat16", layers: int | None = None, seed: int = 0
) -> Path:
    """Write config.json, model.safetensors (and a tiny tokenizer) for `shape` into `directory`;
    `layers` keeps only the first blocks. Returns the directory. Refuses, before writing anything,
    when the disk has less free space than the files need."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ConfigError(
            f"dtype {dtype!r} is not supported for random weights; expected one of {', '.join(TORCH_DTYPES)}"
        )
    if layers is not None:
        shape = shape.with_layers(layers)
    directory = Path(directory)
    tensors = tensor_shapes(shape)
    header = _header(tensors, SAFETENSORS_DTYPES[dtype], TORCH_DTYPES[dtype].itemsize)
    need = 8 + len(header) + file_bytes(shape, dtype)
    free = shutil.disk_usage(_existing_parent(directory)).free
    if free < need:
        raise ConfigError(
            f"{directory}: writing a random {shape.model_type} model needs {need} bytes ({need / 1e9:.2f} GB) "
            f"but the disk has {free} bytes ({free / 1e9:.2f} GB) free; pass layers= to write fewer blocks"
        )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = shape.vocab_size >= TOKENIZER_VOCAB
    if tokenizer:
        _write_tokenizer(directory)
    else:
        for stale in ("tokenizer.json", "tokenizer_config.json"):  # from an earlier model written here
            (directory / stale).unlink(missing_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(shape, dtype, tokenizer), indent=2) + "\n")
    # A partial file under another name: an interrupted write never looks like a loadable model.
    partial = directory / "model.safetensors.partial"
    generator = torch.Generator().manual_seed(seed)
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, dims in tensors:
            for band in _random_bands(name, dims, shape, generator):
                f.write(band.to(TORCH_DTYPES[dtype]).contiguous().view(torch.uint8).numpy().data)
    os.replace(partial, directory / "model.safetensors")
    return directory


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for x in dims:
        n *= x
    return n


def _header(tensors: list[tuple[str, tuple[int, ...]]], st_dtype: str, itemsize: int) -> bytes:
    """The safetensors JSON header, padded with spaces to 8 bytes so the data stays aligned."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        end = offset + _numel(dims) * itemsize
        entries[name] = {"dtype": st_dtype, "shape": list(dims), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _random_bands(
    name: str, dims: tuple[int, ...], shape: ModelShape, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """The tensor's values, a band of whole rows at a time (float32)."""
    if len(dims) == 1:
        values = 0.1 * torch.randn(dims, generator=generator)
        if "norm" in name and shape.family != "gemma3":
            values += 1.0  # Llama-style norms scale by w; Gemma's by (1 + w)
        yield values
        return
    rows, cols = dims
    step = max(1, BAND_ELEMENTS // cols)
    for a in range(0, rows, step):
        yield WEIGHT_STD * torch.randn(min(step, rows - a), cols, generator=generator)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _write_tokenizer(directory: Path) -> None:
    """A byte-level BPE with no merges: every UTF-8 byte is a token (ids 0..255), then <bos>, <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS])
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
