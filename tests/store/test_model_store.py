"""The model store's reads and copies: /api/show of embedded and created models, copies under other names."""

from __future__ import annotations

import pytest

from tests.store.helpers import FULL, TEMPLATE
from tests.tiny import make_hf_model
from tp_ollama.errors import ModelNotFound
from tp_ollama.store.embedded import EMBEDDED
from tp_ollama.store.names import InvalidModelName


def test_show_embedded_model(store):
    show = store.show("smollm2:135m")
    info = show["model_info"]
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] == 134515008
    assert info["llama.context_length"] == 8192
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["tokenizer.ggml.tokens"] == []  # long arrays only with verbose
    assert "<|im_start|>" in show["template"]  # the GGUF's own chat template
    assert show["details"]["quantization_level"] == "Q4_1"
    assert show["capabilities"][0] == "completion"
    assert f"FROM {EMBEDDED['smollm2:135m']()}\n" in show["modelfile"]
    assert "TEMPLATE" not in show["modelfile"]  # no TEMPLATE layer: the checkpoint's template applies


def test_show_reflects_a_created_model(store, gguf_path):
    store.create("pirate", gguf_path, **FULL)
    show = store.show("pirate")
    assert show["template"] == TEMPLATE and show["system"] == "You are terse."
    assert show["license"] == "MIT License"
    assert show["parameters"].splitlines() == [
        "temperature                    0.2",
        'stop                           "<|user|>"',
        'stop                           "###"',
        "num_ctx                        2048",
    ]
    assert show["messages"][1] == {"role": "assistant", "content": "hello"}
    assert show["model_info"]["general.parameter_count"] == sum(p.numel() for p in make_hf_model("llama").parameters())
    assert show["model_info"]["llama.block_count"] == 3
    assert show["capabilities"] == ["completion"]
    assert show["details"]["format"] == "gguf"
    assert "modified_at" in show


def test_copy(store, gguf_path):
    store.create("src", gguf_path, system="s")
    store.copy("SRC", "other/dst:tag")
    entries = {e.name: e for e in store.list()}
    assert entries["other/dst:tag"].digest == entries["src:latest"].digest
    assert store.resolve("other/dst:tag").system == "s"
    with pytest.raises(ModelNotFound, match='model "missing" not found'):
        store.copy("missing", "x")
    with pytest.raises(InvalidModelName):
        store.copy("src", "bad name")
