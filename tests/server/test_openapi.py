"""openapi.yaml: a valid OpenAPI 3.0.3 document, served at GET /openapi.json, that lists exactly the
(path, method) pairs the app routes, in both directions: a route added without documenting it fails
here, and so does a documented route that the app does not serve."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route
from starlette.testclient import TestClient

from tests.server.doubles import ScriptedEngine
from tp_ollama import __version__
from tp_ollama.server.app import create_app
from tp_ollama.store.model_store import ModelStore

REPO = Path(__file__).resolve().parents[2]
YAML = REPO / "tp_ollama" / "server" / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Starlette:
    # With a store, so that the store routes are mounted: the document describes a full server.
    return create_app(ScriptedEngine([]), store=ModelStore(tmp_path_factory.mktemp("models")), version=__version__)


@pytest.fixture(scope="module")
def served(app: Starlette) -> dict[str, Any]:
    with TestClient(app, base_url="http://localhost") as client:  # the Host guard refuses "testserver"
        reply = client.get("/openapi.json")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    return reply.json()


def _routed(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, Route):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)  # {model:path} -> {model}
            for method in route.methods or ():
                yield path, method.upper()
        elif isinstance(route, Mount):
            sub = route.routes
            if sub:
                yield from _routed(sub, prefix + route.path)
            else:  # a mounted ASGI app (a metrics exporter, say) answers GET at its path
                yield prefix + route.path, "GET"


def _without_implied_head(pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Starlette answers HEAD wherever it answers GET: such a HEAD may or may not be documented."""
    pairs = set(pairs)
    return {(p, m) for p, m in pairs if not (m == "HEAD" and (p, "GET") in pairs)}


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item if method in METHODS}


def test_the_document_is_valid_openapi_3_0_3(served):
    assert served["openapi"] == "3.0.3"
    schemathesis.openapi.from_dict(served).validate()  # the OpenAPI 3.0 meta-schema; raises if invalid
    assert served["info"]["version"] == __version__


def test_every_ref_resolves(served):
    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    missing = []
    for ref in set(refs(served)):
        target: Any = served
        for part in ref.removeprefix("#/").split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if not ref.startswith("#/") or target is None:
            missing.append(ref)
    assert not missing, f"unresolvable $ref: {sorted(missing)}"


def test_every_operation_has_a_unique_operation_id(served):
    ids = [op["operationId"] for item in served["paths"].values() for m, op in item.items() if m in METHODS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_the_documented_routes_are_exactly_the_served_ones(app, served):
    routed = _without_implied_head(_routed(app.routes))
    documented = _without_implied_head(_documented(served))
    assert not documented - routed, f"documented but not served: {sorted(documented - routed)}"
    assert not routed - documented, f"served but not documented: {sorted(routed - documented)}"


def test_the_served_json_is_the_yaml(served):
    doc = yaml.safe_load(YAML.read_text(encoding="utf-8"))
    doc["info"]["version"] = __version__
    assert served == doc


def test_the_yaml_ships_in_the_wheel():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "server/openapi.yaml" in package_data["tp_ollama"]
