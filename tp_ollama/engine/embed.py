"""Sentence embeddings from a decoder: the mean of the final (normed) hidden states over each input's
tokens, for a batch of inputs at once.

Inputs of different lengths share one forward pass, right-padded: attention is causal, so the pad
positions after an input's last token never change its hidden states, and the mean skips them.
Inputs are grouped by length so that a batch carries little padding and at most `token_budget`
positions, which bounds the activation memory of one pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.errors import RequestError

TOKEN_BUDGET = 8192  # padded positions per forward pass


@torch.inference_mode()
def embed_batch(model: nn.Module, inputs: Sequence[Sequence[int]], token_budget: int = TOKEN_BUDGET) -> torch.Tensor:
    """(len(inputs), hidden) float32 mean-pooled vectors, not normalised, in the order given."""
    empty = [i for i, ids in enumerate(inputs) if not ids]
    if empty:
        raise RequestError(f"input {empty[0]} has no tokens: every input needs at least one")
    device: torch.device = next(model.parameters()).device
    hidden_size = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    out = torch.empty(len(inputs), hidden_size, dtype=torch.float32)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    start = 0
    while start < len(order):
        # The longest input of a group comes last (sorted), so the group's width is known as it grows.
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= token_budget:
            end += 1
        group = order[start:end]
        out[group] = _pooled(model, [inputs[i] for i in group], device).float().cpu()
        start = end
    return out


def _pooled(model: nn.Module, batch: list[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(ids) for ids in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    real = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        real[row, : len(seq)] = True
    positions = torch.arange(width, dtype=torch.long, device=device)[None].expand(len(batch), width)
    cache = KVCache.for_model(model, batch=len(batch), max_len=width)
    hidden = model.hidden_states(ids, positions, cache).float()  # type: ignore[operator]  # (B, T, H)
    weights = real.unsqueeze(-1).float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
