"""The store's files: a blob is deleted when no manifest references it any more, an HF view when no
model needs it."""

from __future__ import annotations

import hashlib

import pytest

from tests.store.helpers import blobs
from tp_ollama.errors import ModelNotFound


def test_create_replaces_a_model_and_prunes_its_old_layers(store, gguf_path):
    store.create("m", gguf_path, system="first")
    first = blobs(store)
    store.create("m", gguf_path, system="second")
    assert store.resolve("m").system == "second"
    old_system = "sha256-" + hashlib.sha256(b"first").hexdigest()
    assert old_system in first and old_system not in blobs(store)
    assert len([e for e in store.list() if e.name == "m:latest"]) == 1


def test_delete_removes_only_unreferenced_blobs(store, gguf_path):
    store.create("a", gguf_path, system="only in a")
    store.copy("a", "b")
    store.create("c", "a", system="only in c")
    uploaded = b"an upload not used by any model yet"
    store.add_blob("sha256:" + hashlib.sha256(uploaded).hexdigest(), uploaded)
    weights = store.resolve("a").path.name
    all_blobs = blobs(store)

    store.delete("a")
    assert blobs(store) == all_blobs  # b still holds everything a had
    assert not (store.root / "manifests/registry.ollama.ai/library/a").exists()  # empty dirs pruned
    store.delete("b")
    a_system = "sha256-" + hashlib.sha256(b"only in a").hexdigest()
    assert a_system not in blobs(store) and weights in blobs(store)  # c still uses the weights
    store.delete("c")
    assert blobs(store) == {"sha256-" + hashlib.sha256(uploaded).hexdigest()}
    with pytest.raises(ModelNotFound, match="model 'a' not found"):
        store.delete("a")


def test_delete_an_hf_model_removes_its_view(store, hf_dir):
    store.create("hf", hf_dir)
    view = store.resolve("hf").path
    store.delete("hf")
    assert not view.exists() and blobs(store) == set()
