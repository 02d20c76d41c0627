"""The shapes of decoder models, with Hugging Face config.json field names: what the cost model and
the random-weight checkpoints need, with no weights attached.

A ModelShape carries every field TPLayout.build reads, so a layout is built from a shape directly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tp_ollama.errors import ConfigError

# Families whose blocks are Gemma 3's: four norms per block, per-head q/k norms, two rotary tables.
GEMMA3_TYPES = frozenset({"gemma3", "gemma3_text"})
# model_type values tp_ollama.models builds (kept in step with tp_ollama.models.REGISTRY by a test).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model shape {name}={value!r} is invalid: expected an integer >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model shape has {self.num_attention_heads} query heads, not a multiple of "
                f"{self.num_key_value_heads} KV heads"
            )

    @property
    def family(self) -> str:
        return "gemma3" if self.model_type in GEMMA3_TYPES else self.model_type

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v biases; the other families have none (attention_bias is not modelled)."""
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family in ("gemma3", "qwen3")

    @property
    def hidden_norms_per_layer(self) -> int:
        """RMSNorms of width hidden_size in one block."""
        return 4 if self.family == "gemma3" else 2

    @property
    def rotary_tables(self) -> int:
        """Inverse-frequency buffers (head_dim / 2 float32 each): Gemma 3 has a local and a global one."""
        return 2 if self.family == "gemma3" else 1

    def layer_parameters(self) -> int:
        """Parameters of one decoder block: projections, biases and norms."""
        d, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        linear = d * q + 2 * d * kv + q * d + 3 * d * i
        bias = q + 2 * kv if self.qkv_bias else 0
        norms = self.hidden_norms_per_layer * d + (2 * self.head_dim if self.qk_norm else 0)
        return linear + bias + norms

    def parameters(self) -> int:
        """Parameters of the whole model (a tied LM head counted once), as torch counts them."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.num_hidden_layers * self.layer_parameters() + self.hidden_size

    def with_layers(self, layers: int) -> ModelShape:
        """The same model cut to its first `layers` blocks (for timing big shapes on a small machine)."""
        if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= self.num_hidden_layers:
            raise ConfigError(f"layers={layers!r} is invalid: expected 1..{self.num_hidden_layers}")
        return replace(self, num_hidden_layers=layers)


# Figures from each model's Hugging Face config.json.
SHAPES: dict[str, ModelShape] = {
    "gemma3-270m": ModelShape(
        model_type="gemma3_text",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": ModelShape(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": ModelShape(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama3-8b": ModelShape(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def shape_named(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ConfigError(f"model shape {name!r} is not known; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def shape_of(config: Any) -> ModelShape:
    """The shape of one of tp_ollama.models' config dataclasses (or anything with those fields)."""
    missing = [f for f in ModelShape.__dataclass_fields__ if not hasattr(config, f)]
    if missing:
        raise ConfigError(f"{type(config).__name__} has no {', '.join(missing)}: not a model config")
    return ModelShape(
        model_type=str(config.model_type),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_hidden_layers=int(config.num_hidden_layers),
        num_attention_heads=int(config.num_attention_heads),
        num_key_value_heads=int(config.num_key_value_heads),
        head_dim=int(config.head_dim),
        vocab_size=int(config.vocab_size),
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )
