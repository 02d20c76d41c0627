"""tp_ollama.text.prompt: a one-shot prompt encoded raw (with BOS where the tokenizer's settings say) or as one
chat turn after an optional system turn, rendered with the model's template; and the tokenizer of a Hugging
Face directory or of a GGUF file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import save_tiny_tokenizer
from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.store.embedded import smollm2_135m
from tp_ollama.text.prompt import prompt_tokens, tokenizer_at


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer whose template writes turns as `<|role|>content` lines, and BOS by its settings."""
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(directory)
    return directory


def test_a_raw_prompt_is_the_text_with_bos(tiny_dir: Path):
    tokenizer = tokenizer_at(tiny_dir)
    ids = prompt_tokens(tokenizer, "hello world")
    assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids) == "hello world"
    assert ids == tokenizer.encode("hello world", add_special_tokens=True)


def test_a_chat_prompt_is_one_user_turn_after_the_system_turn(tiny_dir: Path):
    tokenizer = tokenizer_at(tiny_dir)
    ids = prompt_tokens(tokenizer, "hello", chat=True)
    assert tokenizer.decode(ids) == "<|user|>hello\n<|assistant|>"
    assert tokenizer.bos_id not in ids  # the template writes BOS where the model wants it; this one does not
    with_system = prompt_tokens(tokenizer, "hello", chat=True, system="be brief")
    assert tokenizer.decode(with_system) == "<|system|>be brief\n<|user|>hello\n<|assistant|>"


def test_the_tokenizer_comes_from_a_directory_or_a_gguf_file(tiny_dir: Path):
    assert tokenizer_at(tiny_dir).vocab_size == Tokenizer.from_hf_dir(tiny_dir).vocab_size
    gguf = smollm2_135m()
    from_file = tokenizer_at(gguf)
    assert from_file.vocab_size == Tokenizer.from_gguf(gguf).vocab_size > 1000
    assert from_file.chat_template is not None
