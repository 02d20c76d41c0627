"""What a checkpoint says about itself: the file facts that keep it from being hashed twice, and the
capabilities a template gives."""

from __future__ import annotations

from tp_ollama.store import inspect as store_inspect
from tp_ollama.store.model_store import ModelStore


def test_embedded_digests_are_cached_by_path_size_and_mtime(tmp_path, facts, monkeypatch):
    first = ModelStore(tmp_path / "a", facts_path=facts).list()

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(store_inspect, "hash_file", no_hashing)
    monkeypatch.setattr(store_inspect, "inspect_checkpoint", no_hashing)
    again = ModelStore(tmp_path / "b", facts_path=facts).list()
    assert [(e.name, e.digest) for e in again] == [(e.name, e.digest) for e in first]


def test_capabilities_follow_the_template(store, gguf_path):
    store.create("tools", gguf_path, template="{{ if .Tools }}{{ .Tools }}{{ end }}{{ .Prompt }}")
    store.create("fim", gguf_path, template="<PRE>{{ .Prompt }}<SUF>{{ .Suffix }}<MID>")
    assert store.show("tools")["capabilities"] == ["completion", "tools"]
    assert store.show("fim")["capabilities"] == ["completion", "insert"]
