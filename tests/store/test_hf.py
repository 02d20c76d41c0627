"""Pulling hf.co/{org}/{repo}[:{quant}] through huggingface_hub, against a double of the Hub's endpoints
(tests/store/hf_double.py) reached through HF_ENDPOINT, into a fresh store: a GGUF repo (the file the
tag names) and a safetensors repo (config, tokenizer, weights)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import SMOL, serving
from tests.store.hf_double import HubDouble
from tests.tiny import make_hf_model, save_hf, save_tiny_tokenizer
from tp_ollama.errors import ModelNotFound
from tp_ollama.store.hf import HubError, pick_gguf
from tp_ollama.store.model_store import ModelStore


def test_the_tag_picks_a_gguf_by_its_quantization():
    files = ["README.md", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "m.Q4_K_S.gguf", "big-Q4_K_M-00001-of-00002.gguf"]
    assert pick_gguf(files, "latest") == "m-Q4_K_M.gguf"
    assert pick_gguf(files, "q8_0") == "m-Q8_0.gguf"
    assert pick_gguf(files, "Q4_K_S") == "m.Q4_K_S.gguf"
    assert pick_gguf(files, "Q4_K") is None  # a whole word only: Q4_K is neither Q4_K_M nor Q4_K_S
    assert pick_gguf(["a-F16.gguf", "b-Q8_0.gguf"], "latest") == "a-F16.gguf"
    assert pick_gguf(["config.json"], "latest") is None


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubDouble]:
    double = HubDouble()
    gguf = Path(ModelStore(tmp_path_factory.mktemp("probe")).resolve(SMOL).path)
    double.repos["org/smol-GGUF"] = {"README.md": b"# smol\n", "smol-Q4_1.gguf": gguf.read_bytes()}
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_hf(make_hf_model("llama", seed=3), folder)
    save_tiny_tokenizer(folder)
    double.add_folder("org/tiny-llama", folder)
    with serving(double.app()) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", url)
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield double


def test_a_gguf_repo_pulls_the_file_its_tag_names(hub: HubDouble, tmp_path: Path):
    store = ModelStore(tmp_path)
    steps: list[str] = []
    layers: list[tuple[str, int, int]] = []
    store.pull("hf.co/org/smol-GGUF:Q4_1", status=steps.append, layer=lambda *a: layers.append(a))
    assert steps[0] == "pulling manifest" and steps[-1] == "success"
    assert layers and layers[-1][1] == layers[-1][2] > 0
    resolved = store.resolve("hf.co/org/smol-GGUF:Q4_1")
    assert resolved.format == "gguf" and resolved.details.family == "llama"
    assert "hf.co/org/smol-GGUF:Q4_1" in store.names()
    assert hub.gets["org/smol-GGUF/smol-Q4_1.gguf"] == 1 and hub.gets["org/smol-GGUF/README.md"] == 0
    store.pull("hf.co/org/smol-GGUF:Q4_1")  # already here: nothing fetched
    assert hub.gets["org/smol-GGUF/smol-Q4_1.gguf"] == 1


def test_a_safetensors_repo_pulls_its_directory(hub: HubDouble, tmp_path: Path):
    store = ModelStore(tmp_path)
    store.pull("hf.co/org/tiny-llama")
    resolved = store.resolve("hf.co/org/tiny-llama")
    assert resolved.format == "safetensors"
    assert (Path(resolved.path) / "config.json").is_file()


def test_a_missing_repo_or_quantization_is_named(hub: HubDouble, tmp_path: Path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFound, match="has no repository org/nothing"):
        store.pull("hf.co/org/nothing")
    with pytest.raises(HubError, match=r"no GGUF file of org/smol-GGUF matches 'Q9_9': smol-Q4_1\.gguf"):
        store.pull("hf.co/org/smol-GGUF:Q9_9")
    assert store.names() == [] or all(not n.startswith("hf.co") for n in store.names())


def test_a_corrupt_file_fails_naming_it_and_is_fetched_again(
    hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached yet
    store = ModelStore(tmp_path / "models")
    hub.corrupt.add(("org/tiny-llama", "model.safetensors"))
    try:
        with pytest.raises(HubError, match=r"model\.safetensors does not match its sha256 on the Hub"):
            store.pull("hf.co/org/tiny-llama")
    finally:
        hub.corrupt.clear()
    assert "hf.co/org/tiny-llama:latest" not in store.names()
    store.pull("hf.co/org/tiny-llama")  # the bad copy was dropped: fetched again, right this time
    assert "hf.co/org/tiny-llama:latest" in store.names()
