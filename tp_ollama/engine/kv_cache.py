"""Preallocated KV cache, one per sequence batch. Full-attention layers keep every position;
sliding-window layers keep a ring of `window` slots, so their memory does not grow with num_ctx."""

from __future__ import annotations

import torch

from tp_ollama.kernels.linear import activation_like, out_features


class LayerKV:
    """One layer's keys and values: (B, n_kv, capacity, D), plus the absolute position held in each
    slot (B, capacity), -1 when empty. Slot of position p is p % capacity."""

    def __init__(
        self, batch: int, n_kv: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.capacity = capacity
        self.k = torch.zeros(batch, n_kv, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.used = 0  # slots [0, used) may hold data; attention never looks past them

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k, v: (B, n_kv, T, D); positions: (B, T). Returns what attention should see; for one new
        token, positions None: every kept slot is visible (filled from position 0 on, and a ring
        holds exactly the window), so decode attends without building a mask."""
        t = k.shape[2]
        if t > 1 and self.used + t > self.capacity:
            # Only a ring (sliding-window) cache gets here: writing this chunk first would overwrite
            # slots that the chunk's earlier queries still need. Attend over the old cache plus the
            # chunk, then keep only the newest entries. A single token (t == 1) only evicts the
            # position that just left its window, so decode always takes the cheap path below.
            k_all = torch.cat((self.k[:, :, : self.used], k), dim=2)
            v_all = torch.cat((self.v[:, :, : self.used], v), dim=2)
            pos_all = torch.cat((self.pos[:, : self.used], positions), dim=1)
            keep = min(t, self.capacity)
            self._write(k[:, :, -keep:], v[:, :, -keep:], positions[:, -keep:])
            return k_all, v_all, pos_all
        self._write(k, v, positions)
        return self.k[:, :, : self.used], self.v[:, :, : self.used], None if t == 1 else self.pos[:, : self.used]

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        # Every row of a batch here advances in lockstep, so row 0's positions pick the slots.
        slots = positions[0] % self.capacity  # (T,)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.pos.index_copy_(1, slots, positions)
        self.used = max(self.used, int(slots.max()) + 1)


class KVCache:
    """Caches for every layer of a model, sized from the model's config and its local weights."""

    def __init__(self, layers: list[LayerKV]) -> None:
        self.layers = layers

    def layer(self, index: int) -> LayerKV:
        return self.layers[index]

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        layers = []
        like = activation_like(model)
        for block in model.model.layers:  # type: ignore[union-attr]
            attn = block.self_attn
            # local KV heads, from the (maybe sharded) weight; none for another pipeline stage's layer
            n_kv = 0 if getattr(block, "absent", False) else out_features(attn.k_proj) // attn.head_dim
            capacity = max_len if attn.window is None else min(max_len, attn.window)
            layers.append(LayerKV(batch, n_kv, capacity, attn.head_dim, dtype or like.dtype, like.device))
        return cls(layers)
