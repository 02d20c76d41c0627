"""Sentence embeddings from a decoder: the mean of the final (normed) hidden states over each input's
tokens.

Each input has a forward pass of its own. Batching inputs would save little (embedding inputs are
short) and would make a vector depend on its neighbours: quantized matmuls pick their kernel by
the number of rows they multiply (int8 activations for a few rows, bfloat16 for many), so the same
text would embed a little differently alone and in a batch. Ollama's clients compare embeddings
across requests, so an input's vector is a function of the input alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.errors import RequestError
from tp_ollama.kernels.quant import prefill_numerics


@torch.inference_mode()
def embed_batch(model: nn.Module, inputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """(len(inputs), hidden) float32 mean-pooled vectors, not normalised, in the order given."""
    empty = [i for i, ids in enumerate(inputs) if not ids]
    if empty:
        raise RequestError(f"input {empty[0]} has no tokens: every input needs at least one")
    device: torch.device = next(model.parameters()).device
    hidden_size = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    out = torch.empty(len(inputs), hidden_size, dtype=torch.float32)
    with prefill_numerics():
        for i, ids in enumerate(inputs):
            out[i] = _pooled(model, ids, device).float().cpu()
    return out


def _pooled(model: nn.Module, ids: Sequence[int], device: torch.device) -> torch.Tensor:
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    positions = torch.arange(len(ids), dtype=torch.long, device=device)[None]
    cache = KVCache.for_model(model, batch=1, max_len=len(ids))
    hidden = model.hidden_states(tokens, positions, cache).float()  # type: ignore[operator]  # (1, T, H)
    return hidden[0].mean(dim=0)
