"""Gemma 3 text decoder: sliding-window layers interleaved with global ones, per-head q/k norms,
four norms per block with (1 + w) scaling, scaled embeddings, two rope bases, GELU-tanh MLP,
tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tp_ollama.kernels.linear import activation_like
from tp_ollama.models.common import (
    Embedding,
    ModelCache,
    RMSNorm,
    RopeSpec,
    Rotary,
    apply_rotary,
    attention,
    merge_heads,
    project,
    split_heads,
)
from tp_ollama.models.llama import FULL, SLIDING


@dataclass(frozen=True)
class Gemma3TextConfig:
    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()
    # (layer_type, ((key, value), ...)) pairs: HF's per-layer-type rope_parameters, frozen.
    rope_parameters: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    max_position_embeddings: int = 131072
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1

    family: ClassVar[str] = "gemma3"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Gemma3TextConfig:
        d = dict(d.get("text_config") or d)  # a Gemma3ForConditionalGeneration config nests the text part
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known and v is not None}
        kw.pop("model_type", None)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        pattern = int(d.get("sliding_window_pattern", 6))
        kw["layer_types"] = tuple(
            d.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
        )
        kw["rope_parameters"] = tuple(
            (kind, tuple(sorted(params.items()))) for kind, params in sorted(gemma_rope_parameters(d).items())
        )
        return cls(**kw)

    def rope(self, layer_type: str) -> RopeSpec:
        return RopeSpec.from_hf(dict(dict(self.rope_parameters)[layer_type]), self.head_dim)


def gemma_rope_parameters(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer-type rope settings from transformers 5 `rope_parameters` or the older flat keys."""
    params = d.get("rope_parameters")
    if params and FULL in params:
        return {k: dict(v) for k, v in params.items()}
    full = dict(d.get("rope_scaling") or {})
    full["rope_theta"] = d.get("rope_theta", 1_000_000.0)
    full.setdefault("rope_type", "default")
    local = {"rope_type": "default", "rope_theta": d.get("rope_local_base_freq", 10_000.0)}
    return {FULL: full, SLIDING: local}


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig, layer_type: str) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        # Set by a tensor-parallel plan when this shard's query heads straddle KV groups.
        self.kv_map: torch.Tensor | None
        self.register_buffer("kv_map", None, persistent=False)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.window = cfg.sliding_window if layer_type == SLIDING else None
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, unit_offset=True)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Any
    ) -> torch.Tensor:
        q, k, v = project(self, x, ("q_proj", "k_proj", "v_proj"))
        q = self.q_norm(split_heads(q, self.head_dim))  # (B, Hq_local, T, D)
        k = self.k_norm(split_heads(k, self.head_dim))  # (B, Hkv_local, T, D)
        v = split_heads(v, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k_all, v_all, k_pos = cache.update(k, v, positions)
        out = attention(q, k_all, v_all, positions, k_pos, self.scale, self.window, self.kv_map)
        return self.o_proj(merge_heads(out))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, x, ("gate_proj", "up_proj"))
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3Block(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig, layer_type: str) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Gemma3Attention(cfg, layer_type)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, unit_offset=True)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Any
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, rope, cache)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3Body(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.rotary_full = Rotary(cfg.rope(FULL))
        self.rotary_sliding = Rotary(cfg.rope(SLIDING))


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: Gemma3TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Gemma3Body(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        m = self.model
        stage = self.__dict__.get("pipeline")  # a pipeline stage (tp_ollama.parallel.pipeline)
        if stage is not None:
            dtype = activation_like(self).dtype
            ropes = {FULL: m.rotary_full(positions, dtype), SLIDING: m.rotary_sliding(positions, dtype)}
            kinds = self.config.layer_types

            def body(x: torch.Tensor) -> torch.Tensor:
                x = x.to(dtype)
                for i in stage.layers:
                    x = m.layers[i](x, positions, ropes[kinds[i]], cache.layer(i))
                return x

            shape = (*input_ids.shape, self.config.hidden_size)
            x = stage.run(lambda: self._embed(input_ids), body, shape, input_ids.device)
            return m.norm(x.to(dtype)) if stage.last else x
        x = self._embed(input_ids)
        ropes = {FULL: m.rotary_full(positions, x.dtype), SLIDING: m.rotary_sliding(positions, x.dtype)}
        for i, (layer, kind) in enumerate(zip(m.layers, self.config.layer_types, strict=True)):
            x = layer(x, positions, ropes[kind], cache.layer(i))
        return m.norm(x)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        # transformers scales by sqrt(hidden) cast to the weight dtype first; so do we, for bf16 parity.
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., vocab); a pipeline stage other than the last has none: (..., 0)."""
        stage = self.__dict__.get("pipeline")
        if stage is not None and not stage.last:
            return hidden.new_empty((*hidden.shape[:-1], 0))
        head = self.model.embed_tokens.project if self.lm_head is None else self.lm_head
        logits = head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, cache))

    def reset_buffers(self, device: torch.device, extra: dict[str, torch.Tensor]) -> None:
        self.model.rotary_full.reset_parameters(device)
        self.model.rotary_sliding.reset_parameters(device)
