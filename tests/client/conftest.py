"""The servers the client commands talk to, shared by this package's tests: smollm2:135m behind a
LocalEngine, and a model store."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.client.live import SMOL, ChatRecorder, Live, serving
from tests.local_engine import LocalEngine
from tests.server.doubles import Details, EmbeddedModel, EmbeddedModels
from tp_ollama import __version__
from tp_ollama.server.app import create_app
from tp_ollama.store.embedded import smollm2_135m


@pytest.fixture(scope="package")
def chat_server() -> Iterator[Live]:
    """smollm2:135m made greedy and short (model PARAMETERs), so answers are the same every run."""
    path = smollm2_135m()
    greedy = {"temperature": 0, "seed": 1, "num_predict": 40}
    models = EmbeddedModels(
        {
            SMOL: EmbeddedModel(SMOL, path, params=greedy, digest="ab" * 32, details=Details("gguf", "llama")),
            "smol-long:latest": EmbeddedModel("smol-long:latest", path, params={**greedy, "num_predict": 4000}),
        }
    )
    recorder = ChatRecorder(create_app(LocalEngine(), models, version=__version__))
    with serving(recorder) as host:
        yield Live(host, recorder)


@pytest.fixture(scope="package")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from tp_ollama.store.model_store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("models"))
    app = create_app(LocalEngine(), store=store, version=__version__)
    with serving(app) as host:
        yield Live(host, store=store)


@pytest.fixture(scope="session")
def command() -> list[str]:
    """`python -m tp_ollama`, as a user runs `tp-ollama`."""
    return [sys.executable, "-m", "tp_ollama"]
