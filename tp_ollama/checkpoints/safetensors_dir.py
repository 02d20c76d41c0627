"""A Hugging Face model directory: config.json plus model.safetensors or a sharded index.
safetensors files are memory-mapped; a slice read copies only the requested rows or columns."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tp_ollama.checkpoints.base import FileEnsure, Range, check_range
from tp_ollama.errors import CheckpointError
from tp_ollama.models import config_from_hf

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ITEM_BYTES |= {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class SafetensorsCheckpoint:
    """`ensure`, when given, is told the byte ranges of a weights file before they are read (files of
    which a node holds only some ranges: tp_ollama.store.partial)."""

    format = "safetensors"

    def __init__(self, path: Path, ensure: FileEnsure | None = None, identity: str | None = None) -> None:
        self.path = path
        self.identity = identity  # the files' digests when known: what caches key them by instead of paths
        self._ensure = ensure
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}  # a partial file's data start and header
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
        try:
            self.hf_config: dict[str, Any] = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
        self.config = config_from_hf(self.hf_config, str(config_path))
        self._files = self._weight_files()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for file in sorted(set(self._files.values())):
            for key in self._open(file).keys():
                self._where[key] = file

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            return {k: self.path / v for k, v in weight_map.items()}
        if single.is_file():
            return {"*": single}
        raise CheckpointError(
            f"{self.path}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors weights are supported)"
        )

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (named in the safetensors index)")
            if self._ensure is not None:
                self._headers[file] = self._fetch_header(file)
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
            self._handles[file] = handle
        return handle

    def _fetch_header(self, file: Path) -> tuple[int, dict[str, Any]]:
        """A partial file's header (an 8-byte length, then JSON), fetched first."""
        assert self._ensure is not None
        self._ensure(file, [(0, 8)])
        with file.open("rb", buffering=0) as f:  # unbuffered: bytes past those fetched are not read ahead
            (n,) = struct.unpack("<Q", f.read(8))
            if n > file.stat().st_size - 8:
                raise CheckpointError(f"{file}: not a safetensors file (a header of {n} bytes)")
            self._ensure(file, [(8, 8 + n)])
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not a safetensors file ({e})") from e
        return 8 + n, header

    def _need(self, file: Path, key: str, rows: Range | None, cols: Range | None) -> None:
        """Tell `ensure` of the bytes a read of rows / columns of tensor `key` touches."""
        if self._ensure is None:
            return
        start, header = self._headers[file]
        entry = header[key]
        shape = entry["shape"]
        item = ITEM_BYTES.get(entry["dtype"], 8)
        a, b = (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        if not shape:
            self._ensure(file, [(a, b)])
            return
        row_bytes = (b - a) // shape[0]
        r0, r1 = rows if rows is not None else (0, shape[0])
        if cols is None or len(shape) != 2:
            self._ensure(file, [(a + r0 * row_bytes, a + r1 * row_bytes)])
            return
        c0, c1 = cols
        self._ensure(file, [(a + r * row_bytes + c0 * item, a + r * row_bytes + c1 * item) for r in range(r0, r1)])

    def _key(self, name: str) -> str:
        if name in self._where:
            return name
        # Multimodal Gemma 3 checkpoints keep the text model under language_model.
        alt = name.replace("model.", "model.language_model.", 1)
        if alt in self._where:
            return alt
        raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")

    def names(self) -> set[str]:
        return {k.replace("model.language_model.", "model.", 1) for k in self._where}

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._key(name)
        return tuple(self._open(self._where[key]).get_slice(key).get_shape())

    def read(self, name: str, dtype: torch.dtype, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        key = self._key(name)
        file = self._where[key]
        view = self._open(file).get_slice(key)
        shape = view.get_shape()
        check_range(file, name, shape[0], rows, "rows")
        if cols is not None:
            check_range(file, name, shape[-1], cols, "columns")
        r = slice(*rows) if rows else slice(None)
        self._need(file, key, rows, cols)
        try:
            if cols is None:
                t = view[r]
            else:
                t = view[r, slice(*cols)]
        except SafetensorError as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({e})") from e
        return t.to(dtype)

    def extra_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {}

    def model_info(self) -> dict[str, Any]:
        c = self.config
        info = {"general.architecture": c.model_type, "general.file_type": self.hf_config.get("torch_dtype")}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            info[f"{c.model_type}.{key}"] = getattr(c, key)
        return info

    def close(self) -> None:
        self._handles.clear()
