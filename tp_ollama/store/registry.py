"""Pulling models from (and pushing them to) a registry that speaks Ollama's protocol (the one `ollama pull` uses, the
OCI distribution API): the manifest, then every blob by digest, each checked against its sha256
before the manifest is written, so that a model is listed only once all of it is here and right.

    GET {scheme}://{host}/v2/{namespace}/{model}/manifests/{tag}     Accept: the Docker v2 manifest
    GET {scheme}://{host}/v2/{namespace}/{model}/blobs/{digest}      redirects followed (a CDN)

The scheme is https, or http with `insecure` (as upstream). A registry that answers 401 with a
`WWW-Authenticate: Bearer realm=...` challenge is asked for an anonymous token. A transfer cut
short resumes where it stopped with a Range request; every network wait has a timeout, and a
failed one is retried a few times with a growing pause. Two pulls of one blob at once download it
once: the second waits for the first and finds the blob there. A push uploads each layer the
registry lacks (a monolithic upload: POST for a location, PUT with the digest), then the manifest.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tp_ollama.errors import ModelNotFound, TpOllamaError
from tp_ollama.store.manifests import MANIFEST_TYPE, BlobWriter, Layer, Manifest
from tp_ollama.store.names import ModelName

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROGRESS_EVERY_S = 0.1  # at most this often a layer's progress is reported
ACCEPT = f"{MANIFEST_TYPE}, application/vnd.oci.image.manifest.v1+json"


class RegistryError(TpOllamaError):
    """A pull that cannot go on: the message names the registry, the model and the layer."""


# (digest, total bytes, bytes so far): called as a layer's bytes arrive.
Progress = Callable[[str, int, int], None]

_blob_locks: dict[str, threading.Lock] = {}
_blob_locks_guard = threading.Lock()


def _blob_lock(digest: str) -> threading.Lock:
    with _blob_locks_guard:
        return _blob_locks.setdefault(digest, threading.Lock())


@dataclass
class Registry:
    insecure: bool = False
    timeout_s: float = 30.0  # connecting, and each read of the body
    retries: int = 3  # attempts per request after the first, with a growing pause
    pause_s: float = 0.5

    def __post_init__(self) -> None:
        self._token: str | None = None
        self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=True)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def base(self, name: ModelName) -> str:
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://{name.host}/v2/{name.namespace}/{name.model}"

    # --- the manifest -------------------------------------------------------------------------------

    def manifest(self, name: ModelName) -> tuple[bytes, Manifest]:
        """The manifest's bytes (what is written to the store) and its parsed form."""
        url = f"{self.base(name)}/manifests/{name.tag}"
        response = self._request("GET", url, name, "the manifest", headers={"Accept": ACCEPT})
        if response.status_code == 404:
            where = f"{name.host} has no {name.namespace}/{name.model}:{name.tag}"
            raise ModelNotFound(name.display, f"pull model manifest: file does not exist: {where}")
        self._check(response, name, "the manifest")
        data = response.content
        return data, Manifest.parse(data, f"the manifest of {name.display} from {name.host}")

    # --- blobs --------------------------------------------------------------------------------------

    def pull_blob(
        self, name: ModelName, layer: Layer, have: Callable[[str], bool], writer: Callable[[str], BlobWriter],
        progress: Progress,
    ) -> None:  # fmt: skip
        """Download one layer into the store (`writer(digest)` checks its sha256 on commit), unless
        `have(digest)`; resumes with Range when the connection is cut."""
        with _blob_lock(layer.digest):
            if have(layer.digest):
                progress(layer.digest, layer.size, layer.size)
                return
            with writer(layer.digest) as w:
                self._download(name, layer, w, progress)
                try:
                    w.commit()
                except TpOllamaError as e:
                    raise RegistryError(
                        f"pulling {name.display} from {name.host}: layer {layer.digest} is corrupt: {e}"
                    ) from None

    def _download(self, name: ModelName, layer: Layer, w: BlobWriter, progress: Progress) -> None:
        url = f"{self.base(name)}/blobs/{layer.digest}"
        what = f"layer {layer.digest}"
        failures = 0
        last = 0.0
        while w.size < layer.size or layer.size == 0:
            headers = {"Range": f"bytes={w.size}-"} if w.size else {}
            try:
                with closing(self._stream(url, name, headers)) as response:
                    if w.size and response.status_code == 200:
                        # No Range support: the bytes start over.
                        w.restart()
                    self._check(response, name, what)
                    for chunk in response.iter_bytes(CHUNK):
                        w.write(chunk)
                        if w.size > layer.size:
                            raise RegistryError(
                                f"pulling {name.display} from {name.host}: {what} is larger than the "
                                f"{layer.size} bytes its manifest says"
                            )
                        now = time.monotonic()
                        if now - last >= PROGRESS_EVERY_S:
                            last = now
                            progress(layer.digest, layer.size, w.size)
                if layer.size == 0 or w.size >= layer.size:
                    break
                raise httpx.ReadError("the registry ended the body early")
            except (httpx.TransportError, httpx.StreamError) as e:
                failures += 1
                if failures > self.retries:
                    raise RegistryError(
                        f"pulling {name.display} from {name.host}: {what} failed after {w.size} of "
                        f"{layer.size} bytes: {e}"
                    ) from None
                log.warning("%s of %s: %s; resuming at byte %d", what, name.display, e, w.size)
                time.sleep(self.pause_s * failures)
        progress(layer.digest, layer.size, w.size)

    # --- pushing ------------------------------------------------------------------------------------

    def push_blob(
        self, name: ModelName, layer: Layer, path: Path | None, data: bytes | None, progress: Progress
    ) -> None:
        """Upload one layer (from the file `path`, or `data`) unless the registry has it: a monolithic
        upload (POST for a location, then PUT with the digest)."""
        what = f"layer {layer.digest}"
        base = self.base(name)
        head = self._request("HEAD", f"{base}/blobs/{layer.digest}", name, what, "pushing")
        if head.status_code == 200:
            progress(layer.digest, layer.size, layer.size)
            return
        start = self._request("POST", f"{base}/blobs/uploads/", name, what, "pushing")
        if start.status_code != 202 or "location" not in start.headers:
            self._check(start, name, f"starting the upload of {what}", "pushing")
            raise RegistryError(f"pushing {name.display} to {name.host}: {what}: no upload location given")
        location = str(start.url.join(start.headers["location"]))
        target = f"{location}{'&' if '?' in location else '?'}digest={layer.digest}"

        def body() -> Iterator[bytes]:
            sent = 0
            if data is not None:
                chunks: Iterable[bytes] = (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
            else:
                assert path is not None
                chunks = _file_chunks(path)
            for chunk in chunks:
                sent += len(chunk)
                progress(layer.digest, layer.size, sent)
                yield chunk

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(layer.size)}
        try:
            put = self._client.put(target, content=body(), headers=self._headers(headers))
        except httpx.TransportError as e:
            raise RegistryError(f"pushing {name.display} to {name.host}: {what} failed: {e}") from None
        self._check(put, name, what, "pushing")

    def push_manifest(self, name: ModelName, data: bytes) -> None:
        url = f"{self.base(name)}/manifests/{name.tag}"
        put = self._request("PUT", url, name, "the manifest", "pushing", headers={"Content-Type": MANIFEST_TYPE},
                            content=data)  # fmt: skip
        self._check(put, name, "the manifest", "pushing")

    # --- HTTP ---------------------------------------------------------------------------------------

    def _request(
        self, method: str, url: str, name: ModelName, what: str, verb: str = "pulling",
        headers: dict[str, str] | None = None, **kw: Any,
    ) -> httpx.Response:  # fmt: skip
        failures = 0
        extra = dict(headers or {})
        while True:
            try:
                response = self._client.request(method, url, headers=self._headers(extra), **kw)
                if response.status_code == 401 and self._authenticate(response, name):
                    response = self._client.request(method, url, headers=self._headers(extra), **kw)
                return response
            except httpx.TransportError as e:
                failures += 1
                if failures > self.retries:
                    raise RegistryError(f"{verb} {name.display}: cannot reach {name.host} for {what}: {e}") from None
                time.sleep(self.pause_s * failures)

    def _stream(self, url: str, name: ModelName, headers: dict[str, str]) -> httpx.Response:
        request = self._client.build_request("GET", url, headers=self._headers(headers))
        response = self._client.send(request, stream=True)
        if response.status_code == 401:
            response.close()
            if self._authenticate(response, name):
                request = self._client.build_request("GET", url, headers=self._headers(headers))
                response = self._client.send(request, stream=True)
        return response

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        return {**extra, **({"Authorization": f"Bearer {self._token}"} if self._token else {})}

    def _authenticate(self, response: httpx.Response, name: ModelName) -> bool:
        """An anonymous token for a `Bearer realm=...,service=...,scope=...` challenge."""
        challenge = response.headers.get("www-authenticate", "")
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm:
            return False
        r = self._client.get(realm, params=params)
        if r.status_code != 200:
            raise RegistryError(
                f"pulling {name.display}: {name.host} refused a token ({r.status_code}): {r.text[:200]}"
            )
        body = r.json()
        self._token = body.get("token") or body.get("access_token")
        return bool(self._token)

    @staticmethod
    def _check(response: httpx.Response, name: ModelName, what: str, verb: str = "pulling") -> None:
        if response.status_code in (200, 201, 202, 206):
            return
        try:
            text = response.read().decode(errors="replace")[:300]
        except httpx.HTTPError:
            text = ""
        where = "from" if verb == "pulling" else "to"
        raise RegistryError(f"{verb} {name.display} {where} {name.host}: {what}: HTTP {response.status_code} {text}")


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
