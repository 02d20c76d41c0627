"""The Llama family: llama, mistral, qwen2 and qwen3 share one decoder with a few switches
(q/k biases for Qwen2, per-head q/k norms for Qwen3, sliding windows for Mistral and some Qwen)."""

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

FULL, SLIDING = "full_attention", "sliding_attention"


def hf_rope_parameters(d: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling."""
    params = d.get("rope_parameters")
    if params:
        return dict(params)
    params = dict(d.get("rope_scaling") or {})
    params["rope_theta"] = d.get("rope_theta", default_theta)
    return params


@dataclass(frozen=True)
class LlamaConfig:
    """HF config.json fields of the Llama family (unknown keys are ignored, like transformers)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_parameters: tuple[tuple[str, Any], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    hidden_act: str = "silu"

    family: ClassVar[str] = "llama"
    default_theta: ClassVar[float] = 10000.0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known and v is not None}
        kw["rope_parameters"] = tuple(sorted(hf_rope_parameters(d, cls.default_theta).items()))
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        kw["layer_types"] = tuple(d.get("layer_types") or cls.default_layer_types(d))
        if not kw.get("head_dim"):
            kw["head_dim"] = int(d["hidden_size"]) // int(d["num_attention_heads"])
        kw.setdefault("num_key_value_heads", d.get("num_attention_heads", 32))
        return cls(**kw)

    @classmethod
    def default_layer_types(cls, d: dict[str, Any]) -> list[str]:
        n = int(d.get("num_hidden_layers", 32))
        if d.get("use_sliding_window") and d.get("sliding_window"):
            start = int(d.get("max_window_layers", 0))
            return [SLIDING if i >= start else FULL for i in range(n)]
        return [FULL] * n

    @property
    def rope(self) -> RopeSpec:
        return RopeSpec.from_hf(dict(self.rope_parameters), self.head_dim)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return False


@dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    model_type: str = "mistral"
    family: ClassVar[str] = "mistral"

    @classmethod
    def default_layer_types(cls, d: dict[str, Any]) -> list[str]:
        # Mistral applies its window (when set) on every layer.
        kind = SLIDING if d.get("sliding_window") else FULL
        return [kind] * int(d.get("num_hidden_layers", 32))


@dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    model_type: str = "qwen2"
    family: ClassVar[str] = "qwen2"

    @property
    def qkv_bias(self) -> bool:
        return True  # Qwen2 always has q/k/v biases (and no o bias)


@dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    model_type: str = "qwen3"
    family: ClassVar[str] = "qwen3"

    @property
    def qk_norm(self) -> bool:
        return True


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_type: str) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        # Set by a tensor-parallel plan when this shard's query heads straddle KV groups.
        self.kv_map: torch.Tensor | None
        self.register_buffer("kv_map", None, persistent=False)
        self.scale = hd**-0.5
        self.window = cfg.sliding_window if layer_type == SLIDING else None
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=cfg.attention_bias and cfg.family != "qwen2")
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
    ) -> torch.Tensor:
        q, k, v = project(self, x, ("q_proj", "k_proj", "v_proj"))
        q = split_heads(q, self.head_dim)  # (B, Hq_local, T, D)
        k = split_heads(k, self.head_dim)  # (B, Hkv_local, T, D)
        v = split_heads(v, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k_all, v_all, k_pos = cache.update(k, v, positions)
        out = attention(q, k_all, v_all, positions, k_pos, self.scale, self.window, self.kv_map)
        return self.o_proj(merge_heads(out))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, x, ("gate_proj", "up_proj"))
        return self.down_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_type: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_type)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: Any
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope)


class LlamaForCausalLM(nn.Module):
    """Module names match HF checkpoint keys, so loading is a plain name lookup."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """input_ids, positions: (B, T) -> final-normed hidden states (B, T, hidden)."""
        m = self.model
        stage = self.__dict__.get("pipeline")  # a pipeline stage (tp_ollama.parallel.pipeline)
        if stage is not None:
            dtype = activation_like(self).dtype
            rope = m.rotary(positions, dtype)

            def body(x: torch.Tensor) -> torch.Tensor:
                x = x.to(dtype)
                for i in stage.layers:
                    x = m.layers[i](x, positions, rope, cache.layer(i))
                return x

            shape = (*input_ids.shape, self.config.hidden_size)
            x = stage.run(lambda: m.embed_tokens(input_ids), body, shape, input_ids.device)
            return m.norm(x.to(dtype)) if stage.last else x
        x = m.embed_tokens(input_ids)
        rope = m.rotary(positions, x.dtype)
        for i, layer in enumerate(m.layers):
            x = layer(x, positions, rope, cache.layer(i))
        return m.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., vocab); a pipeline stage other than the last has none: (..., 0)."""
        stage = self.__dict__.get("pipeline")
        if stage is not None and not stage.last:
            return hidden.new_empty((*hidden.shape[:-1], 0))
        head = self.model.embed_tokens.project if self.lm_head is None else self.lm_head
        return head(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, cache))

    def reset_buffers(self, device: torch.device, extra: dict[str, torch.Tensor]) -> None:
        """Fill non-checkpoint buffers after loading (rotary table; llama3 GGUFs ship rope_freqs)."""
        self.model.rotary.reset_parameters(device, extra.get("rope_freqs"))
