"""What every checkpoint reader offers: a family config and tensors by their Hugging Face names,
readable whole or as a range of rows / columns so that a rank reads only its shard."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

Range = tuple[int, int]
# Called with byte ranges before they are read, for a file of which only some ranges are on this node
# (tp_ollama.store.partial): of one file, or of the file named.
Ensure = Callable[[Sequence[Range]], None]
FileEnsure = Callable[[Path, Sequence[Range]], None]


class Checkpoint(Protocol):
    path: Path
    config: Any  # the family config dataclass (tp_ollama.models)
    format: str  # "gguf" or "safetensors"

    def names(self) -> set[str]:
        """HF tensor names present (e.g. model.layers.0.self_attn.q_proj.weight)."""
        ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dtype: torch.dtype, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        """The tensor (or rows a..b-1 of dim 0 / columns of the last dim) as `dtype`."""
        ...

    def extra_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Small non-parameter tensors a model may need (GGUF rope_freqs)."""
        ...

    def model_info(self) -> dict[str, Any]:
        """Key facts for /api/show (architecture, sizes, quantization)."""
        ...

    def close(self) -> None: ...


def check_range(path: Path, name: str, dim_size: int, r: Range | None, what: str) -> None:
    from tp_ollama.errors import CheckpointError

    if r is not None and not (0 <= r[0] < r[1] <= dim_size):
        raise CheckpointError(f"{path}: {what} {r[0]}:{r[1]} of tensor {name} is outside 0:{dim_size}")
