"""A small HTTP client for the Ollama API, for the `tp-ollama run/list/ps/show/...` commands.

Every failure becomes a `ClientError` whose text is one line a user can act on: the server's own
`error` text (`model 'x' not found`), or that the server cannot be reached. Streams are NDJSON,
one object per line; a line with `error` ends the stream with that error (as the Go client does).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Mapping
from typing import Any

import httpx

from tp_ollama.errors import TpOllamaError


class ClientError(TpOllamaError):
    """A request that failed; `status` is the HTTP status (-1 for an error line inside a stream).
    `no_route`: a 404/405 without an Ollama error body, i.e. the server lacks this endpoint."""

    def __init__(self, message: str, status: int = -1, no_route: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.no_route = no_route


def server_url(environ: Mapping[str, str]) -> str:
    """Where the server is, from OLLAMA_HOST (default 127.0.0.1:11434; 0.0.0.0 becomes loopback)."""
    from tp_ollama.config.values import parse_ollama_host

    return parse_ollama_host(environ.get("OLLAMA_HOST", "")).client_url()


class Client:
    def __init__(self, base_url: str, timeout: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # No read timeout by default: loading a big model across nodes takes minutes.
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _unreachable(self) -> ClientError:
        return ClientError(f"could not connect to tp-ollama server at {self.base_url} (is 'tp-ollama serve' running?)")

    def _check(self, method: str, path: str, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        text = response.read().decode(errors="replace").strip()
        try:
            message = str(json.loads(text)["error"])
        except (ValueError, KeyError, TypeError):
            # A plain-text (or, for HEAD, empty) 404/405 is the router's: this server lacks the route.
            message = f"{method} {path}: {text or f'HTTP {response.status_code}'}"
            raise ClientError(message, response.status_code, no_route=response.status_code in (404, 405)) from None
        raise ClientError(message, response.status_code)

    def request(self, method: str, path: str, body: Any = None, content: Iterable[bytes] | None = None) -> Any:
        """One request; the decoded JSON reply (None for an empty body)."""
        try:
            response = self._http.request(method, path, json=body, content=content)
        except httpx.ConnectError:
            raise self._unreachable() from None
        except httpx.TransportError as e:
            raise ClientError(f"{method} {path}: {type(e).__name__}: {e}") from None
        self._check(method, path, response)
        return response.json() if response.content.strip() else None

    def stream(self, path: str, body: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        """POST and yield each NDJSON object as it arrives. Closing the generator (or Ctrl-C while it
        runs) closes the connection, which cancels the request on the server."""
        try:
            with self._http.stream("POST", path, json=dict(body)) as response:
                self._check("POST", path, response)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:
                        raise ClientError(str(chunk["error"]))
                    yield chunk
        except httpx.ConnectError:
            raise self._unreachable() from None
        except httpx.TransportError as e:
            raise ClientError(f"the connection to {self.base_url} broke: {type(e).__name__}: {e}") from None

    # --- the API -------------------------------------------------------------------------------

    def chat(self, body: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        return self.stream("/api/chat", {**body, "stream": True})

    def generate(self, body: Mapping[str, Any]) -> Any:
        return self.request("POST", "/api/generate", {**body, "stream": False})

    def tags(self) -> list[dict[str, Any]]:
        return list((self.request("GET", "/api/tags") or {}).get("models", []))

    def ps(self) -> list[dict[str, Any]]:
        return list((self.request("GET", "/api/ps") or {}).get("models", []))

    def show(self, model: str, verbose: bool = False) -> dict[str, Any]:
        return dict(self.request("POST", "/api/show", {"model": model, "verbose": verbose}) or {})

    def delete(self, model: str) -> None:
        self.request("DELETE", "/api/delete", {"model": model})

    def copy(self, source: str, destination: str) -> None:
        self.request("POST", "/api/copy", {"source": source, "destination": destination})

    def create(self, body: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        return self.stream("/api/create", {**body, "stream": True})

    def pull(self, model: str, insecure: bool = False) -> Generator[dict[str, Any], None, None]:
        return self.stream("/api/pull", {"model": model, "insecure": insecure, "stream": True})

    def push(self, model: str, insecure: bool = False) -> Generator[dict[str, Any], None, None]:
        return self.stream("/api/push", {"model": model, "insecure": insecure, "stream": True})

    def has_blob(self, digest: str) -> bool:
        try:
            response = self._http.head(f"/api/blobs/{digest}")
        except httpx.ConnectError:
            raise self._unreachable() from None
        if response.status_code == 404:
            return False
        self._check("HEAD", f"/api/blobs/{digest}", response)
        return True

    def push_blob(self, digest: str, content: Iterable[bytes]) -> None:
        self.request("POST", f"/api/blobs/{digest}", content=content)
