"""Model families, keyed by Hugging Face `model_type`. Plain single-device nn.Modules."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from tp_ollama.errors import ConfigError
from tp_ollama.models.common import ModelCache
from tp_ollama.models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig
from tp_ollama.models.llama import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config, Qwen3Config


class CausalLM(Protocol):
    """What the engine uses of a model."""

    config: Any

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: ModelCache) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def reset_buffers(self, device: torch.device, extra: dict[str, torch.Tensor]) -> None: ...


# model_type -> (config class, model class)
REGISTRY: dict[str, tuple[Any, type[nn.Module]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, LlamaForCausalLM),
    "qwen3": (Qwen3Config, LlamaForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
}


def config_from_hf(d: dict[str, Any], source: str = "config") -> Any:
    """Build the family config from a config.json dict; an unknown model_type names the known ones."""
    model_type = d.get("model_type")
    if model_type not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported: {known}")
    return REGISTRY[model_type][0].from_hf(d)


def build_model(config: Any) -> nn.Module:
    return REGISTRY[config.model_type][1](config)
