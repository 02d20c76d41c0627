"""Packed weights saved after the first quantized load, so later loads skip reading, dequantizing
and packing: one safetensors file per (checkpoint file, quant, dtype, this rank's slices, CPU int4
layout) under `$TP_OLLAMA_CACHE/packed/` (default ~/.cache/tp-ollama). The checkpoint is named by
its digests when the load knows them (a store's model), else by path, size and modification time: a
changed file gets a new entry, never a stale one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tp_ollama.kernels import hugepages
from tp_ollama.kernels import quant as quant_module
from tp_ollama.kernels.quant import Int4Weight, Int8Weight, QuantWeight

log = logging.getLogger(__name__)

# 2: int4 layouts named (tile, arrangement); 3: int8 scales per group, in float32; 4: int8 blocked or plain
FORMAT_VERSION = 4
KEEP_ENTRIES = 8  # most recently used entries kept; older ones are deleted when a new one is saved


def cache_key(
    checkpoint: Path, plan: list[tuple[str, str, Any]], quant: str, dtype: torch.dtype, identity: str | None = None
) -> str:
    """plan: (module path, packing, tp_slice) of every weight to pack, in load order. `identity` (the
    files' digests), when known, names the checkpoint instead of its files' paths, sizes and times."""
    files = sorted(checkpoint.iterdir()) if checkpoint.is_dir() else [checkpoint]
    named = identity or [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    ident = {
        "version": FORMAT_VERSION,
        "files": named,
        "quant": quant,
        "dtype": str(dtype),
        "int4_layout": quant_module.int4_layout(),  # looked up at call time: the layout is the process's choice
        "plan": [[path, packing, list(s) if s is not None else None] for path, packing, s in plan],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


class PackedCache:
    def __init__(self, root: Path, key: str) -> None:
        self.path = root / "packed" / f"{key}.safetensors"

    def load(self) -> dict[str, QuantWeight] | None:
        """The cached weights by module path, or None when there is no (readable) entry."""
        if not self.path.exists():
            return None
        try:
            kinds, tensors = _read_safetensors(self.path)
        except Exception as e:  # a truncated or foreign file: rebuild it
            log.warning("ignoring unreadable packed-weights cache %s: %s", self.path, e)
            return None
        os.utime(self.path)  # recently used: kept when older entries are pruned
        weights: dict[str, QuantWeight] = {}
        for path, (kind, group, *layout) in kinds.items():
            if kind == "int8":
                weights[path] = Int8Weight(tensors[f"{path}.q"], tensors[f"{path}.scale"], group, layout == ["blocked"])
            else:
                weights[path] = Int4Weight(tensors[f"{path}.packed"], tensors[f"{path}.scale_zero"], group)
        return weights

    def save(self, weights: dict[str, QuantWeight]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, tuple[Any, ...]] = {}
        for path, w in weights.items():
            if isinstance(w, Int8Weight):
                tensors[f"{path}.q"], tensors[f"{path}.scale"] = w.q.cpu(), w.scale.cpu()
            else:
                tensors[f"{path}.packed"], tensors[f"{path}.scale_zero"] = w.packed.cpu(), w.scale_zero.cpu()
            kinds[path] = (w.kind, w.group, "blocked") if getattr(w, "blocked", False) else (w.kind, w.group)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"kinds": json.dumps(kinds)})
            os.replace(tmp, self.path)  # atomic: a reader sees the whole file or none
        except OSError as e:  # a read-only or full cache directory costs speed, not the load
            log.warning("could not save packed weights to %s: %s", self.path, e)
            tmp.unlink(missing_ok=True)
            return
        self._prune()

    def _prune(self) -> None:
        entries = sorted(self.path.parent.glob("*.safetensors"), key=_mtime, reverse=True)
        for old in entries[KEEP_ENTRIES:]:
            old.unlink(missing_ok=True)


_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F32": torch.float32, "BF16": torch.bfloat16, "I16": torch.int16}


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The entry's `kinds` metadata and its tensors, each read from the file straight into its own
    tensor in 2 MiB pages (decode streams these every step). Not through a mapping of the file: its
    pages would count in this process's memory beside the copies until the file closed, doubling the
    peak of a load."""
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        kinds = json.loads(header.pop("__metadata__")["kinds"])
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            t = hugepages.empty(tuple(info["shape"]), _DTYPES[info["dtype"]])
            view = t.view(-1).view(torch.uint8).numpy().data
            if hi - lo != len(view):
                raise ValueError(f"{path}: tensor {name} holds {hi - lo} bytes, not {len(view)}")
            done = 0
            while done < len(view):  # a read may stop short of what was asked
                got = os.preadv(f.fileno(), [view[done:]], start + lo + done)
                if got <= 0:
                    raise ValueError(f"{path}: tensor {name} is truncated")
                done += got
            tensors[name] = t
    return kinds, tensors


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed by another process meanwhile
        return 0.0
