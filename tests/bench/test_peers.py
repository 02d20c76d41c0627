"""The peers of `bench compare`, each in its own process: llama.cpp through llama-cpp-python on a tiny
GGUF (when the optional package is installed), and the clear refusals when a peer cannot run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.tiny import write_chat_gguf
from tp_ollama.bench import peers
from tp_ollama.errors import ConfigError


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs the optional extra: .[peers]")
def test_llama_cpp_decodes_the_same_gguf(tmp_path: Path) -> None:
    gguf = write_chat_gguf(tmp_path / "tiny.gguf")
    out = peers.run_peer("llama.cpp", gguf, prompt_tokens=8, gen_tokens=6, threads=1)
    assert out["decode_tok_s"] > 0 and out["prompt_tok_s"] > 0
    assert out["cold_start_s"] > out["load_s"] > 0 and out["peak_rss_mb"] > 10


def test_a_missing_llama_cpp_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        peers._llama_cpp(tmp_path / "x.gguf", 8, 4, 1)


def test_peer_refusals_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="peer 'vllm' is not supported"):
        peers.run_peer("vllm", tmp_path / "x.gguf", 8, 4, 1)
    with pytest.raises(ConfigError, match=r"llama\.cpp needs a GGUF file"):
        peers.run_peer("llama.cpp", tmp_path, 8, 4, 1)
