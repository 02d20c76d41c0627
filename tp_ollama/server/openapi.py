"""GET /openapi.json: the OpenAPI 3.0.3 description of every route, kept by hand in openapi.yaml
(shipped as package data) and served as JSON. tests/server/test_openapi.py checks that the paths and
methods it lists are exactly the ones the app routes."""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tp_ollama.server.schemas import json_response


@functools.cache
def _document() -> dict[str, Any]:
    text = resources.files("tp_ollama.server").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or "paths" not in doc:
        raise RuntimeError("tp_ollama/server/openapi.yaml is not an OpenAPI document (no top-level 'paths')")
    return doc


def openapi_document(version: str) -> dict[str, Any]:
    """The document, with `info.version` set to the version /api/version reports."""
    doc = copy.deepcopy(_document())
    doc["info"]["version"] = version
    return doc


def openapi_route(version: str) -> Route:
    doc = openapi_document(version)  # read once, when the app is built

    async def openapi_json(request: Request) -> Response:
        return json_response(doc)

    return Route("/openapi.json", openapi_json, methods=["GET"])
