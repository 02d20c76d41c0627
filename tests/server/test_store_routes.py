"""The model-store routes (/api/tags, show, create, copy, delete, blobs) through the official ollama
client and raw HTTP, against a real server over a real ModelStore in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import ollama
import pytest

from tests.local_engine import LocalEngine
from tests.server.conftest import SMOL, serving
from tests.tiny import make_hf_model, write_gguf
from tp_ollama import __version__
from tp_ollama.server.app import create_app
from tp_ollama.server.store_schemas import tags_body
from tp_ollama.store.model_store import ModelStore

HEX64 = re.compile(r"[0-9a-f]{64}")
BODY_LIMIT = 64 * 1024  # JSON bodies only: the tiny GGUFs (~750 KB) must upload as blobs anyway
SYSTEM = "You are a pirate. Answer in one short sentence."
MESSAGES = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Arr, a pirate."}]
NEVER = "<|never-in-output|>"


@dataclass
class StoreServer:
    url: str
    store: ModelStore


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreServer]:
    store = ModelStore(tmp_path_factory.mktemp("models"))
    app = create_app(LocalEngine(), store=store, version=__version__, max_body_bytes=BODY_LIMIT)
    with serving(app) as url:
        yield StoreServer(url, store)


@pytest.fixture
def client(store_server: StoreServer) -> Iterator[ollama.Client]:
    client = ollama.Client(host=store_server.url, timeout=120)
    yield client
    client._client.close()


@pytest.fixture
def http(store_server: StoreServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=store_server.url, timeout=120) as client:
        yield client


def tiny_gguf(directory: Path, seed: int) -> Path:
    """A tiny random llama GGUF (no tokenizer: it can be listed and shown, not run)."""
    path = directory / f"tiny-{seed}.gguf"
    write_gguf(make_hf_model("llama", seed=seed), path, "llama", "F32")
    return path


def ndjson(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"] == "application/x-ndjson"
    text = response.text
    assert text.endswith("\n") and "\n\n" not in text
    return [json.loads(line) for line in text[:-1].split("\n")]


def names(client: ollama.Client) -> list[str]:
    return [m.model for m in client.list().models]


def loaded(client: ollama.Client) -> list[str]:
    return [m.model for m in client.ps().models]


def test_checklist_16_tags_lists_the_embedded_models_newest_first(client, http):
    models = client.list().models
    assert {SMOL, "gemma3:270m"} <= {m.model for m in models}
    for m in models:
        assert HEX64.fullmatch(m.digest), m.digest
        assert m.size > 0
        assert m.details.format == "gguf" and m.details.family and m.details.families == [m.details.family]
        assert m.details.parameter_size and m.details.quantization_level
    raw = http.get("/api/tags").json()["models"]
    stamps = [datetime.fromisoformat(m["modified_at"]) for m in raw]
    assert stamps == sorted(stamps, reverse=True)
    assert http.head("/api/tags").status_code == 200
    assert SMOL in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert tags_body([]) == {"models": []}


def test_checklist_17_show_has_model_info_template_and_capabilities(client):
    shown = client.show(SMOL)
    assert isinstance(shown.modelinfo, dict) and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["general.parameter_count"] > 0
    assert shown.template  # the GGUF's own chat template: the model has no TEMPLATE layer
    assert "completion" in (shown.capabilities or [])
    assert shown.details.family == "llama" and shown.details.format == "gguf"
    assert shown.modelfile and "FROM" in shown.modelfile


def test_checklist_22_create_from_a_model_with_system_parameters_messages_license(client, http):
    parameters = {"num_predict": 3, "temperature": 0, "seed": 1, "stop": [NEVER]}
    progress = list(
        client.create(
            "smol-pirate",
            from_=SMOL,
            system=SYSTEM,
            parameters=parameters,
            messages=MESSAGES,
            license="MIT, for the test",
            stream=True,
        )
    )
    assert progress[-1].status == "success"
    assert any(p.status.startswith(("creating new layer", "using existing layer")) for p in progress)
    assert "smol-pirate:latest" in names(client)
    assert names(client)[0] == "smol-pirate:latest"  # newest first

    shown = client.show("smol-pirate")
    assert shown.license == "MIT, for the test"
    assert shown.parameters is not None
    for line in ("num_predict", "temperature", "seed", f'stop                           "{NEVER}"'):
        assert line in shown.parameters
    assert shown.details.parent_model == SMOL and isinstance(shown.modelinfo, dict)
    assert "SYSTEM" in (shown.modelfile or "") and "MESSAGE user" in (shown.modelfile or "")
    raw = http.post("/api/show", json={"model": "smol-pirate"}).json()  # fields ollama-python drops
    assert raw["system"] == SYSTEM and raw["messages"] == MESSAGES

    # The model's SYSTEM, MESSAGEs and PARAMETERs are what a request to it gets: the same prompt
    # (so the same prompt length) and greedy output as the base model asked for all of it explicitly.
    question = {"role": "user", "content": "Where is the treasure?"}
    mine = client.chat("smol-pirate", messages=[question])
    base = client.chat(SMOL, messages=[{"role": "system", "content": SYSTEM}, *MESSAGES, question], options=parameters)
    assert mine.eval_count == 3 and mine.done_reason == "length"
    assert mine.prompt_eval_count == base.prompt_eval_count
    assert mine.message.content == base.message.content
    generated = client.generate("smol-pirate", "Say hi.")
    assert generated.eval_count == 3


def test_checklist_22_create_stream_false_and_the_legacy_modelfile_field(client, http):
    modelfile = f'FROM {SMOL}\nSYSTEM """Be brief."""\nPARAMETER num_predict 2\nLICENSE Apache-2.0\n'
    reply = http.post("/api/create", json={"name": "smol-legacy", "modelfile": modelfile, "stream": False})
    assert reply.status_code == 200 and reply.json() == {"status": "success"}
    shown = http.post("/api/show", json={"model": "smol-legacy"}).json()
    assert shown["system"] == "Be brief." and shown["license"] == "Apache-2.0" and "num_predict" in shown["parameters"]
    assert client.generate("smol-legacy", "Hello", options={"temperature": 0}).eval_count == 2


def test_checklist_22_create_refuses_what_it_cannot_do(client, http):
    def post(body: dict) -> httpx.Response:
        return http.post("/api/create", json=body)

    neither = post({"model": "x"})
    assert neither.status_code == 400 and neither.json() == {"error": "neither 'from' or 'files' was specified"}
    quantize = post({"model": "x", "from": SMOL, "quantize": "q4_K_M"})
    assert quantize.status_code == 400 and "quantize" in quantize.json()["error"]
    assert post({"model": "bad name!", "from": SMOL}).status_code == 400
    assert post({"model": "x", "modelfile": "SYSTEM hi"}).status_code == 400  # no FROM line
    missing = post({"model": "x", "from": "/no/such/model.gguf", "stream": False})
    assert missing.status_code == 400 and "no such file" in missing.json()["error"]

    unknown = post({"model": "x", "from": "no-such-model", "stream": False})
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]
    streamed = ndjson(post({"model": "x", "from": "no-such-model"}))
    assert "not found" in streamed[-1]["error"] and all("status" in line for line in streamed[:-1])
    with pytest.raises(ollama.ResponseError, match="not found"):
        list(client.create("x", from_="no-such-model", stream=True))
    too_big = post({"model": "x", "from": SMOL, "system": "a" * BODY_LIMIT})
    assert too_big.status_code == 413
    assert "x:latest" not in names(client)


def test_checklist_21_copy_then_delete_unloads_and_404s(client, http):
    assert client.copy(SMOL, "smol-copy").status == "success"
    assert "smol-copy:latest" in names(client)
    reply = client.chat("smol-copy", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
    assert reply.done and reply.eval_count == 2
    assert loaded(client) == ["smol-copy:latest"]

    raw = http.post("/api/copy", json={"source": "smol-copy", "destination": "smol-copy-2"})
    assert raw.status_code == 200 and raw.content == b""
    assert client.show("smol-copy-2").details.family == "llama"

    deleted = http.request("DELETE", "/api/delete", json={"model": "smol-copy"})
    assert deleted.status_code == 200 and deleted.content == b""
    assert loaded(client) == []  # the loaded model's name is gone: unloaded, not listed by /api/ps
    assert "smol-copy:latest" not in names(client) and "smol-copy-2:latest" in names(client)
    with pytest.raises(ollama.ResponseError) as e:
        client.show("smol-copy")
    assert e.value.status_code == 404
    assert client.delete("smol-copy-2").status == "success"  # legacy `name` works too:
    assert http.request("DELETE", "/api/delete", json={"name": "smol-copy-2"}).status_code == 404


def test_checklist_21_copy_over_the_loaded_name_unloads_it(client, http):
    client.copy(SMOL, "smol-a")
    client.generate("smol-a", "Hi", options={"num_predict": 1})
    assert loaded(client) == ["smol-a:latest"]
    client.copy(SMOL, "smol-b")
    assert loaded(client) == ["smol-a:latest"]  # another name: nothing changes
    client.create("smol-a", from_=SMOL, system="Now something else.")
    assert loaded(client) == []
    client.delete("smol-a")
    client.delete("smol-b")


def test_checklist_14_unknown_model_is_404_on_show_delete_and_copy(client, http):
    for call in (
        lambda: client.show("no-such-model"),
        lambda: client.delete("no-such-model"),
        lambda: client.copy("no-such-model", "other"),
    ):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and "not found" in e.value.error
    missing = http.post("/api/show", json={"model": "no-such-model"})
    assert missing.json() == {"error": "model 'no-such-model' not found"}
    bad = http.post("/api/copy", json={"source": SMOL, "destination": "bad name!"})
    assert bad.status_code == 400 and bad.json() == {"error": 'destination "bad name!" is invalid'}
    assert http.post("/api/show", json={}).json() == {"error": "model is required"}


def test_checklist_22_create_from_a_gguf_path_on_the_server(client, tmp_path):
    path = tiny_gguf(tmp_path, seed=1)
    statuses = [p.status for p in client.create("tiny-path", from_=str(path), stream=True)]
    assert statuses[-1] == "success" and "parsing GGUF" in statuses
    entry = next(m for m in client.list().models if m.model == "tiny-path:latest")
    assert entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.quantization_level == "F32"
    shown = client.show("tiny-path")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"


def test_checklist_23_blobs_upload_check_and_create_from_one(client, http, tmp_path, store_server):
    path = tiny_gguf(tmp_path, seed=2)
    data = path.read_bytes()
    assert len(data) > BODY_LIMIT  # the JSON body limit does not apply to blobs
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    wrong = f"sha256:{hashlib.sha256(b'something else').hexdigest()}"

    assert http.head(f"/api/blobs/{digest}").status_code == 404
    mismatch = http.post(f"/api/blobs/{wrong}", content=data)
    assert mismatch.status_code == 400
    assert mismatch.json() == {"error": f'digest mismatch, expected "{wrong}", got "{digest}"'}
    assert http.head(f"/api/blobs/{wrong}").status_code == 404
    assert http.post("/api/blobs/sha256:1234", content=data).json() == {"error": "invalid digest format"}

    # Sent in pieces with no Content-Length, as a streamed upload of a large file would be.
    pieces = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
    created = http.post(f"/api/blobs/{digest}", content=pieces)
    assert created.status_code == 201 and created.content == b""
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.head(f"/api/blobs/{digest.replace(':', '-')}").status_code == 200
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200
    assert client.create_blob(path) == digest

    progress = client.create("tiny-blob", files={"model.gguf": digest})
    assert progress.status == "success"
    assert client.show("tiny-blob").details.family == "llama"
    assert "tiny-blob:latest" in names(client)
    from_digest = http.post("/api/create", json={"model": "tiny-blob-2", "from": f"@{digest}", "stream": False})
    assert from_digest.json() == {"status": "success"}
    assert not list(store_server.store.blobs.glob(".partial-*"))  # the failed upload left nothing


def _machine_address() -> str | None:
    """This machine's address on its default route (not loopback), or None without one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # a UDP connect only picks the route; nothing is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow_server_paths"])
def test_create_from_a_server_path_is_for_clients_on_this_machine(tmp_path, allowed):
    """A client reaching the API over the network cannot make the server read its files: `from` with a
    server path is refused (403, saying what to do instead) unless models.allow_server_paths is set;
    the same request over loopback is served. Nothing is created by the refused request."""
    address = _machine_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to reach the server by")
    store = ModelStore(tmp_path / "models")
    app = create_app(LocalEngine(), store=store, version=__version__, bind_host="0.0.0.0", allow_server_paths=allowed)
    with serving(app, host="0.0.0.0") as url:
        port = url.rsplit(":", 1)[1]
        body = {"model": "from-afar", "from": str(tiny_gguf(tmp_path, 5)), "stream": False}
        remote = httpx.post(f"http://{address}:{port}/api/create", json=body, timeout=120)
        if allowed:
            assert remote.status_code == 200, remote.text
        else:
            assert remote.status_code == 403
            assert "allow_server_paths" in remote.json()["error"] and "blob" in remote.json()["error"]
            assert "from-afar" not in {m["name"].split(":")[0] for m in tags_body(store.list())["models"]}
        local = httpx.post(f"{url}/api/create", json={**body, "model": "from-here"}, timeout=120)
        assert local.status_code == 200, local.text
