"""Malformed requests get a 4xx JSON error and the server stays up; Host guard; CORS."""

from __future__ import annotations

from tests.server.conftest import SMOL
from tp_ollama.server.app import allowed_host


def test_checklist_24_empty_body_is_missing_request_body(http):
    for path in ("/api/generate", "/api/chat"):
        response = http.post(path, content=b"")
        assert response.status_code == 400 and response.json() == {"error": "missing request body"}


def test_malformed_json_and_wrong_types_are_400_json(http):
    for content in (b"{not json", b"[1,2]", b'"text"', b"\xff\xfe"):
        response = http.post("/api/generate", content=content)
        assert response.status_code == 400 and isinstance(response.json()["error"], str)
    response = http.post("/api/generate", json={"model": SMOL, "prompt": 3})
    assert response.status_code == 400 and "prompt" in response.json()["error"]
    response = http.post("/api/chat", json={"model": SMOL, "messages": [{"role": "wizard", "content": "x"}]})
    assert response.status_code == 400
    assert http.get("/").status_code == 200  # still up


def test_body_over_the_limit_is_413(http):
    response = http.post("/api/generate", content=b"x" * (33 * 1024 * 1024))
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_unknown_route_and_wrong_method(http):
    assert (http.get("/api/nothing").status_code, http.get("/api/nothing").text) == (404, "404 page not found")
    assert http.get("/api/generate").status_code == 405


def test_host_guard(http):
    assert http.get("/api/version", headers={"Host": "evil.example.com"}).status_code == 403
    assert http.get("/api/version", headers={"Host": "evil.example.com:11434"}).json()["error"]
    for host in (
        "localhost:11434",
        "127.0.0.1",
        "[::1]:11434",
        "app.localhost",
        "box.local",
        "x.internal",
        "192.168.1.4",
    ):
        assert http.get("/api/version", headers={"Host": host}).status_code == 200, host
    assert not allowed_host("203.0.113.9") and allowed_host("10.0.0.1:80")


def test_cors_preflight_and_simple_requests(http):
    preflight = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-stainless-os",
    }
    response = http.options("/api/chat", headers=preflight)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "x-stainless-os" in response.headers["access-control-allow-headers"]
    extension = http.get("/api/version", headers={"Origin": "chrome-extension://abc"})  # OLLAMA_ORIGINS
    assert extension.headers["access-control-allow-origin"] == "chrome-extension://abc"
    assert http.get("/api/version", headers={"Origin": "https://evil.example.com"}).status_code == 403
    assert http.options("/api/chat", headers={**preflight, "Origin": "https://evil.example.com"}).status_code == 403
