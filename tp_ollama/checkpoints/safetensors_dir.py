"""A Hugging Face model directory: config.json plus model.safetensors or a sharded index.
safetensors files are memory-mapped; a slice read copies only the requested rows or columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tp_ollama.checkpoints.base import Range, check_range
from tp_ollama.errors import CheckpointError
from tp_ollama.models import config_from_hf


class SafetensorsCheckpoint:
    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
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
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
            self._handles[file] = handle
        return handle

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
