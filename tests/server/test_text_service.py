"""Errors after a reply started streaming, with a scripted engine (in process): the stream ends with the
error as its last NDJSON line or SSE event (keep-alive and model switching: test_admission.py)."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from tests.server.doubles import EmbeddedModels, ScriptedEngine
from tp_ollama import __version__
from tp_ollama.errors import RequestError
from tp_ollama.server.app import create_app

HELLO = [19556, 905]  # SmolLM2 ids of "Hello world"


def test_checklist_24_error_after_streaming_started_is_a_final_ndjson_line():
    engine = ScriptedEngine(HELLO, fail_with=RequestError("the engine fell over"))
    app = create_app(engine, EmbeddedModels(), version=__version__)
    with TestClient(app, base_url="http://localhost") as client:  # the Host guard refuses "testserver"
        response = client.post(
            "/api/generate", json={"model": "smollm2:135m", "prompt": "Hi", "options": {"temperature": 0}}
        )
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert "".join(line.get("response", "") for line in lines) == "Hello world"
        assert lines[-1] == {"error": "the engine fell over"}
        sse = client.post(
            "/v1/chat/completions",
            json={"model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        last = sse.text.strip().split("\n\n")[-1]
        assert json.loads(last.removeprefix("data: "))["error"]["message"] == "the engine fell over"
