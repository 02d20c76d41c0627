"""A one-shot prompt to token ids: the tokenizer of a checkpoint, and the prompt encoded raw or as one
chat turn (the CLI's `generate`, its helper process and the TP worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tp_ollama.checkpoints.tokenizer import Tokenizer


def prompt_tokens(
    tokenizer: Tokenizer, prompt: str, chat: bool = False, system: str | None = None, **template_kwargs: Any
) -> list[int]:
    """Raw completion: the prompt with BOS when the tokenizer's settings say so. Chat: one user
    message (after an optional system one) rendered with the model's template and generation prompt."""
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=True)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    # The template writes BOS itself where the model wants it, as transformers assumes.
    return tokenizer.encode(text, add_special_tokens=False)


def tokenizer_at(path: Path) -> Tokenizer:
    """The tokenizer of a checkpoint: a Hugging Face directory, else a GGUF file."""
    return Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)
