"""POST /api/pull and /api/push (checklist item 20) through the official ollama client and raw HTTP,
against the real server over a temporary ModelStore that test_store_routes.py builds: a pull of a
local name reports its layers complete; a name its registry lacks is an error that names it; a push
uploads to a registry double on a loopback port."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.server import test_store_routes
from tests.server.conftest import SMOL, serving
from tests.server.test_store_routes import StoreServer, ndjson
from tests.store.registry_double import RegistryDouble

# The fixtures of test_store_routes.py: a live server over a temporary store (one for this module).
store_server, client, http = test_store_routes.store_server, test_store_routes.client, test_store_routes.http

PULL_TAIL = ["verifying sha256 digest", "writing manifest", "success"]


def expected_layer_lines(store_server: StoreServer, name: str) -> list[dict]:
    manifest = store_server.store.manifest(name)
    layers = [*manifest.layers, manifest.config]
    return [
        {
            "status": f"pulling {x.digest.removeprefix('sha256:')[:12]}",
            "digest": x.digest,
            "total": x.size,
            "completed": x.size,
        }
        for x in layers
    ]


def test_checklist_20_pull_of_an_installed_model_streams_its_layers_then_success(client, http, store_server):
    progress = list(client.create("pp-pirate", from_=SMOL, system="Arr.", stream=True))
    assert progress[-1].status == "success"
    layers = expected_layer_lines(store_server, "pp-pirate")
    assert len(layers) == 3  # the weights, the SYSTEM layer, the config blob
    assert len({line["digest"] for line in layers}) == 3

    lines = ndjson(http.post("/api/pull", json={"model": "pp-pirate"}))
    assert lines == [{"status": "pulling manifest"}, *layers, *({"status": s} for s in PULL_TAIL)]

    # The client sees the same sequence, with the digest, total and completed of every layer.
    parts = list(client.pull("pp-pirate", stream=True))
    assert [p.status for p in parts] == [line["status"] for line in lines]
    assert [(p.digest, p.total, p.completed) for p in parts[1:-3]] == [
        (x["digest"], x["total"], x["completed"]) for x in layers
    ]
    assert client.pull("pp-pirate").status == "success"  # stream false: the final object only
    raw = http.post("/api/pull", json={"name": "PP-Pirate:latest", "stream": False})  # legacy `name`, any case
    assert (raw.status_code, raw.json()) == (200, {"status": "success"})


def test_checklist_20_pull_brings_back_a_deleted_embedded_model(client):
    client.delete(SMOL)
    assert SMOL not in [m.model for m in client.list().models]
    statuses = [p.status for p in client.pull(SMOL, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == PULL_TAIL
    assert SMOL in [m.model for m in client.list().models]


def test_checklist_20_pull_of_a_model_its_registry_lacks_is_404_naming_it(client, http):
    """A registry on a loopback port (the double of tests/store/registry_double.py) without the model;
    pulls that reach a registry are tests/server/test_pull_registry.py's."""
    with serving(RegistryDouble().app()) as url:
        name = f"{url.removeprefix('http://')}/nobody/nothing:7b"
        message = f"pull model manifest: file does not exist: {name.split('/')[0]} has no nobody/nothing:7b"
        streamed = http.post("/api/pull", json={"model": name, "insecure": True})
        assert streamed.status_code == 200
        assert ndjson(streamed) == [{"status": "pulling manifest"}, {"error": message}]
        with pytest.raises(ollama.ResponseError) as e:
            list(client.pull(name, insecure=True, stream=True))
        assert e.value.error == message
        with pytest.raises(ollama.ResponseError) as e:
            client.pull(name, insecure=True, stream=False)
        assert (e.value.status_code, e.value.error) == (404, message)


def test_checklist_20_push_of_an_unknown_model_is_not_found(client, http):
    streamed = http.post("/api/push", json={"model": "ghost:1"})
    assert ndjson(streamed) == [{"status": "retrieving manifest"}, {"error": 'model "ghost:1" not found'}]
    with pytest.raises(ollama.ResponseError) as e:
        client.push("ghost:1", stream=False)
    assert (e.value.status_code, e.value.error) == (404, 'model "ghost:1" not found')


def test_checklist_20_push_uploads_an_installed_model_to_its_registry(client, http, store_server):
    double = RegistryDouble()
    with serving(double.app()) as url:
        name = f"{url.removeprefix('http://')}/team/smol:1"
        client.copy(SMOL, name)
        parts = list(client.push(name, insecure=True, stream=True))
        statuses = [p.status for p in parts]
        assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
        manifest = store_server.store.manifest(name)
        layers = {x.digest: x.size for x in (*manifest.layers, manifest.config)}
        assert set(double.pushed) == set(layers)  # the registry had none of them
        done = {p.digest: (p.total, p.completed) for p in parts if p.digest}
        assert done == {d: (size, size) for d, size in layers.items()}
        assert ("team", "smol", "1") in double.manifests
        raw = http.post("/api/push", json={"model": name, "insecure": True, "stream": False})
        assert (raw.status_code, raw.json()) == (200, {"status": "success"})  # again: nothing to upload
        assert len(double.pushed) == len(layers)
        client.delete(name)


@pytest.mark.parametrize("route", ["/api/pull", "/api/push"])
@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "missing request body"),
        (json.dumps({"model": "a/b/c/d"}).encode(), "invalid model name"),
        (json.dumps({"model": "../etc/passwd"}).encode(), "invalid model name"),
        (json.dumps({"model": f"{SMOL}@sha256:{'0' * 64}"}).encode(), "invalid model name"),
        (json.dumps({"model": SMOL, "stream": "yes"}).encode(), "field 'stream' must be boolean, got string"),
        (json.dumps({"model": SMOL, "insecure": 1}).encode(), "field 'insecure' must be boolean, got number"),
    ],
)
def test_checklist_20_bad_requests_are_400(http: httpx.Client, route: str, body: bytes, error: str):
    reply = http.post(route, content=body)
    assert (reply.status_code, reply.json()) == (400, {"error": error})
