"""POST /api/pull from a registry (the double in tests/store/registry_double.py, serving the embedded
SmolLM2 GGUF under another name) into a fresh store, through the official ollama client: progress in
upstream's shape, the model listed and answering as the GGUF itself does; a corrupt layer lists
nothing and keeps only verified blobs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ollama
import pytest

from tests.local_engine import LocalEngine
from tests.server.conftest import SMOL, serving
from tests.store.registry_double import RegistryDouble, digest_of
from tp_ollama import __version__
from tp_ollama.server.app import create_app
from tp_ollama.store.model_store import ModelStore


@dataclass
class Setup:
    url: str  # the server
    registry: str  # host:port of the registry double
    double: RegistryDouble
    store: ModelStore
    weights: bytes


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    store = ModelStore(tmp_path_factory.mktemp("models"))
    weights = Path(store.resolve(SMOL).path).read_bytes()
    double = RegistryDouble()
    double.add_model("library", "smol", "q4", weights, template="{{ .Prompt }}")
    double.add_model("library", "broken", "q4", weights + b"\0", template="{{ .Prompt }}")
    with serving(double.app()) as reg, serving(create_app(LocalEngine(), store=store, version=__version__)) as url:
        yield Setup(url, reg.removeprefix("http://"), double, store, weights)


def test_a_pull_streams_upstreams_progress_and_the_model_answers_as_its_gguf(setup: Setup):
    name = f"{setup.registry}/library/smol:q4"
    with ollama.Client(host=setup.url, timeout=300) as client:
        parts = list(client.pull(name, insecure=True, stream=True))
        statuses = [p.status for p in parts]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        weights = digest_of(setup.weights)
        mine = [p for p in parts if p.digest == weights]
        assert mine and mine[0].status == f"pulling {weights.removeprefix('sha256:')[:12]}"
        assert mine[-1].total == mine[-1].completed == len(setup.weights)
        assert name in [m.model for m in client.list().models]
        options = {"temperature": 0, "num_predict": 12}
        pulled = client.generate(name, "The capital of France is", raw=True, options=options)
        local = client.generate(SMOL, "The capital of France is", raw=True, options=options)
        assert pulled.response == local.response and pulled.eval_count == 12
        assert client.pull(name, insecure=True).status == "success"  # stream false: the last line
    assert setup.double.blob_gets[weights] == 1


def test_a_corrupt_layer_fails_the_pull_and_lists_nothing(setup: Setup):
    name = f"{setup.registry}/library/broken:q4"
    bad = digest_of(setup.weights + b"\0")
    setup.double.corrupt.add(bad)
    with ollama.Client(host=setup.url, timeout=300) as client:
        with pytest.raises(ollama.ResponseError, match=f"layer {bad} is corrupt"):
            list(client.pull(name, insecure=True, stream=True))
        assert name not in [m.model for m in client.list().models]
    assert not setup.store.has_blob(bad)
    assert [p.name for p in setup.store.blobs.iterdir() if p.name.startswith(".")] == []


def test_a_plain_http_registry_needs_insecure(setup: Setup):
    with ollama.Client(host=setup.url, timeout=60) as client, pytest.raises(ollama.ResponseError):
        list(client.pull(f"{setup.registry}/library/smol:q4x", stream=True))
