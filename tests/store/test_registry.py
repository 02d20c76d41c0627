"""The registry client against a registry double on a loopback port (tests/store/registry_double.py):
manifests and blobs, redirects, resuming a cut transfer, refusing wrong bytes, a token challenge,
one download for two pulls of one blob."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import serving
from tests.store.registry_double import RegistryDouble, digest_of
from tests.tiny import make_hf_model, write_gguf
from tp_ollama.errors import ModelNotFound
from tp_ollama.store.model_store import ModelStore
from tp_ollama.store.names import parse_name
from tp_ollama.store.registry import Registry, RegistryError

WEIGHTS = os.urandom(3 << 20)  # three chunks and a bit: a transfer cut half-way has bytes on both sides


@pytest.fixture
def registry() -> Iterator[tuple[RegistryDouble, str]]:
    double = RegistryDouble()
    double.add_model("library", "tiny", "1", WEIGHTS)
    with serving(double.app()) as url:
        yield double, url.removeprefix("http://")


def pull_layers(store: ModelStore, name: str, insecure: bool = True) -> list[tuple[str, int, int]]:
    seen: list[tuple[str, int, int]] = []
    parsed = parse_name(name)
    with Registry(insecure=insecure, pause_s=0.01) as reg:
        _, manifest = reg.manifest(parsed)
        for layer in (*manifest.layers, manifest.config):
            reg.pull_blob(parsed, layer, store.has_blob, store.blob_writer, lambda *a: seen.append(a))
    return seen


def test_a_manifest_and_its_blobs_arrive_verified(registry, tmp_path: Path):
    double, host = registry
    store = ModelStore(tmp_path)
    seen = pull_layers(store, f"{host}/library/tiny:1")
    assert store.blob_path(digest_of(WEIGHTS)).read_bytes() == WEIGHTS
    finals = {d: c for d, t, c in seen if c == t}
    assert set(finals) == set(double.blobs)  # every layer reported complete
    assert double.blob_gets[digest_of(WEIGHTS)] == 1
    again = pull_layers(store, f"{host}/library/tiny:1")  # all here: nothing downloaded
    assert double.blob_gets[digest_of(WEIGHTS)] == 1 and len(again) == 3


def test_a_transfer_cut_half_way_resumes_with_a_range(registry, tmp_path: Path):
    double, host = registry
    double.cut_once.add(digest_of(WEIGHTS))
    store = ModelStore(tmp_path)
    pull_layers(store, f"{host}/library/tiny:1")
    assert store.blob_path(digest_of(WEIGHTS)).read_bytes() == WEIGHTS
    assert double.blob_gets[digest_of(WEIGHTS)] == 2
    assert len(double.ranges) == 1 and double.ranges[0] != "bytes=0-"


def test_wrong_bytes_fail_naming_the_layer_and_leave_nothing(registry, tmp_path: Path):
    double, host = registry
    double.corrupt.add(digest_of(WEIGHTS))
    store = ModelStore(tmp_path)
    with pytest.raises(RegistryError, match=f"layer {digest_of(WEIGHTS)} is corrupt: digest mismatch"):
        pull_layers(store, f"{host}/library/tiny:1")
    assert not store.has_blob(digest_of(WEIGHTS))
    assert [p.name for p in store.blobs.iterdir() if p.name.startswith(".partial")] == []


def test_a_token_challenge_is_answered(registry, tmp_path: Path):
    double, host = registry
    double.needs_token = True
    pull_layers(ModelStore(tmp_path), f"{host}/library/tiny:1")
    assert double.blob_gets[digest_of(WEIGHTS)] == 1


def test_two_pulls_of_one_blob_download_it_once(registry, tmp_path: Path):
    double, host = registry
    store = ModelStore(tmp_path)
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            pull_layers(store, f"{host}/library/tiny:1")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert double.blob_gets[digest_of(WEIGHTS)] == 1


def test_an_unknown_model_and_an_unreachable_registry_are_named(registry, tmp_path: Path):
    _, host = registry
    with Registry(insecure=True) as reg, pytest.raises(ModelNotFound, match=f"file does not exist: {host} has no"):
        reg.manifest(parse_name(f"{host}/library/nothing:1"))
    with Registry(insecure=True, retries=1, pause_s=0.01) as reg, pytest.raises(RegistryError, match="cannot reach"):
        reg.manifest(parse_name("127.0.0.1:9/library/tiny:1"))


def test_https_unless_insecure():
    assert Registry().base(parse_name("gemma3")) == "https://registry.ollama.ai/v2/library/gemma3"
    assert Registry(insecure=True).base(parse_name("h:5000/ns/m:t")) == "http://h:5000/v2/ns/m"


def test_a_push_uploads_what_the_registry_lacks_then_the_manifest(registry, tmp_path: Path):
    double, host = registry
    double.needs_token = True
    store = ModelStore(tmp_path / "a")
    store.pull(f"{host}/library/tiny:1", insecure=True)
    store.copy(f"{host}/library/tiny:1", f"{host}/mine/tiny:2")
    steps: list[str] = []
    store.push(f"{host}/mine/tiny:2", insecure=True, status=steps.append)
    assert steps == ["retrieving manifest", "pushing manifest", "success"]
    assert double.pushed == []  # every layer was there already: only the manifest went
    gguf = tmp_path / "new.gguf"
    write_gguf(make_hf_model("llama", seed=7), gguf, "llama", "F32")
    store.create(f"{host}/mine/new:1", gguf)
    seen: list[tuple[str, int, int]] = []
    store.push(f"{host}/mine/new:1", insecure=True, layer=lambda *a: seen.append(a))
    weights = digest_of(gguf.read_bytes())
    assert weights in double.pushed and (weights, gguf.stat().st_size, gguf.stat().st_size) in seen
    other = ModelStore(tmp_path / "b")  # what was pushed pulls back the same
    other.pull(f"{host}/mine/new:1", insecure=True)
    assert other.blob_path(weights).read_bytes() == gguf.read_bytes()
    assert other.show(f"{host}/mine/new:1")["details"] == store.show(f"{host}/mine/new:1")["details"]


def test_pushing_a_model_not_here_is_not_found(registry, tmp_path: Path):
    _, host = registry
    with pytest.raises(ModelNotFound, match=f'model "{host}/mine/ghost:1" not found'):
        ModelStore(tmp_path).push(f"{host}/mine/ghost:1", insecure=True)
