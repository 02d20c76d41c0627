"""Fixtures of the store tests: a store in a temporary directory, and a tiny random llama written in
the test as a GGUF file and as an HF directory. The embedded GGUFs are hashed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer, write_gguf
from tp_ollama.store.model_store import ModelStore


@pytest.fixture(scope="session")
def facts(tmp_path_factory) -> Path:
    """One file-facts cache for the session, so the embedded GGUFs are hashed once, not per store."""
    return tmp_path_factory.mktemp("facts") / "files.json"


@pytest.fixture
def store(tmp_path, facts) -> ModelStore:
    return ModelStore(tmp_path / "models", facts_path=facts)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_hf_model("llama")


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory, tiny_llama) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_llama, path, "llama", "F32")
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tiny_llama) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(tiny_llama, directory)
    save_tiny_tokenizer(directory)
    (directory / "pytorch_model.bin").write_bytes(b"not stored")  # other weight formats are left out
    return directory
