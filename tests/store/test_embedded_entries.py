"""The embedded models as store entries: listed and resolved without a pull, hidden by a delete until
restored, copied without their weights."""

from __future__ import annotations

import re

import pytest

from tp_ollama.errors import ModelNotFound
from tp_ollama.store.embedded import EMBEDDED
from tp_ollama.store.model_store import ModelStore

HEX64 = re.compile(r"[0-9a-f]{64}")


def test_embedded_models_are_listed_without_a_pull(store):
    entries = {e.name: e for e in store.list()}
    assert set(EMBEDDED) <= set(entries)
    gemma, smol = entries["gemma3:270m"], entries["smollm2:135m"]
    assert (gemma.details.format, gemma.details.family, gemma.details.families) == ("gguf", "gemma3", ("gemma3",))
    assert (smol.details.format, smol.details.family, smol.details.families) == ("gguf", "llama", ("llama",))
    assert (gemma.details.quantization_level, smol.details.quantization_level) == ("Q4_K_M", "Q4_1")
    assert gemma.details.parameter_size == "268.10M"
    assert smol.details.parameter_size == "134.52M"
    for entry in (gemma, smol):
        assert HEX64.fullmatch(entry.digest)
        assert entry.model == entry.name
        assert entry.size > EMBEDDED[entry.name]().stat().st_size  # the weights plus the config blob
    assert not store.manifests.exists() and not store.blobs.exists()  # nothing was copied


def test_embedded_model_resolves_to_the_package_file(store):
    resolved = store.resolve("registry.ollama.ai/library/SmolLM2:135m")
    assert resolved.path == EMBEDDED["smollm2:135m"]()
    assert resolved.format == "gguf" and resolved.template is None and resolved.params == {}
    assert resolved.digest == {e.name: e for e in store.list()}["smollm2:135m"].digest


def test_deleting_an_embedded_model_hides_it_until_restored(store, facts):
    store.delete("gemma3:270m")
    assert "gemma3:270m" not in {e.name for e in store.list()}
    with pytest.raises(ModelNotFound, match="model 'gemma3:270m' not found"):
        store.resolve("gemma3:270m")
    with pytest.raises(ModelNotFound):
        store.delete("gemma3:270m")
    assert ModelStore(store.root, facts_path=facts).resolve("smollm2:135m").path.is_file()  # the other is untouched
    assert store.restore_embedded("GEMMA3:270M")
    assert store.resolve("gemma3:270m").path == EMBEDDED["gemma3:270m"]()
    assert not store.restore_embedded("llama3.2")


def test_copy_an_embedded_model(store, facts):
    store.copy("smollm2:135m", "smol-copy")
    fresh = ModelStore(store.root, facts_path=facts)  # as in a new process: learns the embedded digests
    assert fresh.resolve("smol-copy").path == EMBEDDED["smollm2:135m"]()
    digests = {e.name: e.digest for e in store.list()}
    assert digests["smol-copy:latest"] == digests["smollm2:135m"]
    store.delete("smol-copy")
    assert "smollm2:135m" in {e.name for e in store.list()}
