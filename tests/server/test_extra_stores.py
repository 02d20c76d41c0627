"""An existing Ollama store read in place (models.extra_stores): its models listed and served by a
server whose own store is elsewhere, nothing in it written, deleted or pruned (the tree's checksum
is the same after everything), and what the server makes goes to its own store."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import pytest

from tests.local_engine import LocalEngine
from tests.server.conftest import SMOL, serving
from tp_ollama import __version__
from tp_ollama.config.loading import load_settings
from tp_ollama.errors import ConfigError
from tp_ollama.server.app import create_app
from tp_ollama.store.model_store import ModelStore


def system_of(url: str, name: str) -> str:
    return str(httpx.post(f"{url}/api/show", json={"model": name}, timeout=60).json().get("system"))


def tree_sum(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes() if path.stat().st_size < 1 << 20 else str(path.stat().st_size).encode())
    return h.hexdigest()


@dataclass
class Setup:
    url: str
    ollama_store: Path
    own: ModelStore
    checksum: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    theirs = tmp_path_factory.mktemp("ollama-models")
    other = ModelStore(theirs)  # another installation's store, with a model made the usual way
    gguf = Path(other.resolve(SMOL).path)
    with gguf.open("rb") as f:  # a real installation holds its weights as a blob file
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        f.seek(0)
        other.add_blob(digest, f)
    other.create("their-smol:latest", gguf, system="You answer in French.")
    checksum = tree_sum(theirs)
    own = ModelStore(tmp_path_factory.mktemp("own"), extra_roots=[theirs])
    with serving(create_app(LocalEngine(), store=own, version=__version__)) as url:
        yield Setup(url, theirs, own, checksum)


def test_their_models_are_listed_and_served_in_place(setup: Setup):
    with ollama.Client(host=setup.url, timeout=300) as client:
        assert "their-smol:latest" in [m.model for m in client.list().models]
        assert system_of(setup.url, "their-smol") == "You answer in French."
        options = {"temperature": 0, "num_predict": 8}
        theirs = client.generate("their-smol", "The capital of France is", raw=True, options=options)
        mine = client.generate(SMOL, "The capital of France is", raw=True, options=options)
        assert theirs.response == mine.response
    weights = setup.own.resolve("their-smol").path
    assert Path(weights).is_relative_to(setup.ollama_store)  # loaded from their blob, not a copy
    assert tree_sum(setup.ollama_store) == setup.checksum


def test_their_models_are_never_written(setup: Setup):
    with ollama.Client(host=setup.url, timeout=300) as client:
        with pytest.raises(ollama.ResponseError, match="is in the read-only store"):
            client.delete("their-smol")
        client.copy("their-smol", "my-smol")  # a name of our own store, reading their blobs
        client.create("their-smol", from_="my-smol", system="Mine now.")  # ours shadows theirs
        assert system_of(setup.url, "their-smol") == "Mine now."
        client.delete("their-smol")  # our copy goes; theirs shows again
        assert system_of(setup.url, "their-smol") == "You answer in French."
        client.delete("my-smol")
    assert tree_sum(setup.ollama_store) == setup.checksum


def test_an_extra_store_must_be_an_ollama_store(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"models.extra_stores = .* expected a list of existing Ollama store"):
        load_settings(None, {}, {"extra_stores": str(tmp_path / "nothing")})
    (tmp_path / "manifests").mkdir()
    settings = load_settings(None, {}, {"extra_stores": str(tmp_path)})
    assert settings.models.extra_stores == (tmp_path,)
