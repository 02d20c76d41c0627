"""Open a checkpoint of any supported kind and build a model from it: built on the meta device,
then each parameter read (in the requested dtype) and assigned, so no random init ever runs."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from tp_ollama.checkpoints.base import Checkpoint, FileEnsure
from tp_ollama.errors import CheckpointError
from tp_ollama.models import build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(
    name: str, device: torch.device | str = "cpu", ckpt: Checkpoint | None = None, quant: str = "none"
) -> torch.dtype:
    """Any name but `auto` as parse_dtype. `auto` on a GPU: bfloat16 where it is supported, float16
    elsewhere. `auto` on a CPU: float32 when the linear layers are packed (`quant` int8 or int4, or
    auto on a quantized GGUF): the matmul kernels quantize what they read to int8 either way, so
    16-bit activations would buy no speed and would round the residual stream and the norms, which
    stay float32 as llama.cpp keeps them. For float weights, bfloat16 where the checkpoint stores
    16-bit floats and the CPU computes bfloat16 natively (AVX512-BF16 or AMX), float32 elsewhere."""
    if name != "auto":
        return parse_dtype(name)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if ckpt is not None and (packs_weights(ckpt, quant) or not _stores_16_bit_floats(ckpt)):
        return torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def packs_weights(ckpt: Checkpoint, quant: str) -> bool:
    """Whether loading `ckpt` with `quant` packs any linear layer into int8 or int4."""
    from tp_ollama.checkpoints.quantize import packing_for

    if quant in ("int8", "int4"):
        return True
    stored_type = getattr(ckpt, "stored_type", None)
    if quant != "auto" or stored_type is None:
        return False
    return any(packing_for(quant, stored_type(n)) is not None for n in ckpt.names() if n.endswith("proj.weight"))


def _stores_16_bit_floats(ckpt: Checkpoint) -> bool:
    stored_type = getattr(ckpt, "stored_type", None)
    if stored_type is not None:
        return any(stored_type(n).upper() in ("F16", "BF16") for n in ckpt.names() if n.endswith("proj.weight"))
    hf_config = getattr(ckpt, "hf_config", {})
    return str(hf_config.get("torch_dtype") or hf_config.get("dtype")) in ("bfloat16", "float16")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def open_checkpoint(path: Path, ensure: FileEnsure | None = None, identity: str | None = None) -> Checkpoint:
    """The checkpoint at `path`. `ensure(file, ranges)`, when given, is called before any bytes of a file
    are read (files this node holds in part); `identity` names the files for caches (their digests)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        from tp_ollama.checkpoints.safetensors_dir import SafetensorsCheckpoint

        return SafetensorsCheckpoint(path, ensure, identity)
    if ensure is not None:
        ensure(path, [(0, 4)])
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from tp_ollama.checkpoints.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(path, partial(ensure, path) if ensure is not None else None, identity)
    raise CheckpointError(
        f"{path}: not a GGUF file (it does not begin with 'GGUF') nor a Hugging Face model directory; "
        "expected a .gguf file or a directory with config.json and safetensors weights"
    )


def load_model(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    shard: Callable[[nn.Module], nn.Module] | None = None,
    quant: str = "none",
) -> nn.Module:
    """Build on the meta device, let `shard` (a tensor-parallel plan) cut parameters down to this
    rank's slices, then read exactly those slices from the checkpoint. `quant` (none, int8, int4,
    auto) packs linear layers and the embedding as they are read (tp_ollama.checkpoints.quantize)."""
    from tp_ollama.checkpoints.quantize import check_quant_mode, param_slices, quantize_modules

    check_quant_mode(quant)
    device = torch.device(device)
    if device.type == "cuda":
        # NOTE: SDPA's cuDNN backend builds a new graph for every KV length, ~16 ms of host time
        # per decode call on an H200 (bench/results/gpu_profile.txt); the other kernels don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    with torch.device("meta"):
        model = build_model(ckpt.config)
    if shard is not None:
        model = shard(model)
    available = ckpt.names()
    missing = [n for n, _ in model.named_parameters() if n not in available]
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensors {', '.join(missing[:5])} (of {len(missing)})")
    quantize_modules(model, ckpt, quant, dtype, device)
    state = {}
    for name, param in model.named_parameters():
        rows, cols = param_slices(param)
        t = ckpt.read(name, dtype, rows=rows, cols=cols)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{ckpt.path}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}"
            )
        state[name] = t.to(device)
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_buffers(device, ckpt.extra_tensors(dtype))  # type: ignore[operator]
    return model.to(device).eval()  # moves what plans attached on the CPU (kv_map)
