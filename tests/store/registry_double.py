"""A test double of an Ollama registry (the distribution API `ollama pull` and `ollama push` speak), on
a loopback port: real manifests and blobs, monolithic uploads, faults a test switches on (a transfer
cut half-way, wrong bytes, a bearer-token challenge) and a log of the requests it got."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from tp_ollama.store.manifests import CONFIG_TYPE, MANIFEST_TYPE, MODEL, TEMPLATE

TOKEN = "registry-double-token"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class RegistryDouble:
    manifests: dict[tuple[str, str, str], bytes] = field(default_factory=dict)  # (namespace, model, tag)
    blobs: dict[str, bytes] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # blobs whose next transfer stops half-way
    corrupt: set[str] = field(default_factory=set)  # blobs served with wrong bytes
    needs_token: bool = False
    blob_gets: Counter[str] = field(default_factory=Counter)
    ranges: list[str] = field(default_factory=list)  # Range headers seen
    uploads: dict[str, bytes] = field(default_factory=dict)  # upload id -> bytes so far
    pushed: list[str] = field(default_factory=list)  # digests received by uploads, in order

    def add_model(self, namespace: str, model: str, tag: str, weights: bytes, template: str = "{{ .Prompt }}") -> str:
        """A model of a GGUF file and a template; its manifest's digest."""
        layers = []
        for media_type, data in ((MODEL, weights), (TEMPLATE, template.encode())):
            self.blobs[digest_of(data)] = data
            layers.append({"mediaType": media_type, "digest": digest_of(data), "size": len(data)})
        rootfs = {"type": "layers", "diff_ids": [x["digest"] for x in layers]}
        config = json.dumps(
            {"model_format": "gguf", "model_family": "llama", "model_families": ["llama"], "rootfs": rootfs}
        ).encode()
        self.blobs[digest_of(config)] = config
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(config), "size": len(config)},
            "layers": layers,
        }).encode()  # fmt: skip
        self.manifests[(namespace, model, tag)] = manifest
        return digest_of(manifest)

    def app(self) -> Starlette:
        def authorized(request: Request) -> Response | None:
            if self.needs_token and request.headers.get("authorization") != f"Bearer {TOKEN}":
                realm = f"{request.base_url}token"
                challenge = f'Bearer realm="{realm}",service="registry-double",scope="repository:pull"'
                return Response(status_code=401, headers={"WWW-Authenticate": challenge})
            return None

        async def token(request: Request) -> Response:
            assert request.query_params.get("service") == "registry-double"
            return JSONResponse({"token": TOKEN})

        async def manifest(request: Request) -> Response:
            if (denied := authorized(request)) is not None:
                return denied
            p = request.path_params
            data = self.manifests.get((p["namespace"], p["model"], p["tag"]))
            if data is None:
                return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status_code=404)
            return Response(data, media_type=MANIFEST_TYPE)

        async def blob(request: Request) -> Response:
            if (denied := authorized(request)) is not None:
                return denied
            digest = request.path_params["digest"]
            if digest not in self.blobs:
                return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN"}]}, status_code=404)
            if request.method == "HEAD":
                return Response(status_code=200, headers={"Content-Length": str(len(self.blobs[digest]))})
            return RedirectResponse(f"/cdn/{digest}", status_code=307)  # as the real one sends to its CDN

        async def start_upload(request: Request) -> Response:
            if (denied := authorized(request)) is not None:
                return denied
            upload = f"u{len(self.uploads)}"
            self.uploads[upload] = b""
            p = request.path_params
            return Response(
                status_code=202, headers={"Location": f"/v2/{p['namespace']}/{p['model']}/blobs/uploads/{upload}"}
            )

        async def finish_upload(request: Request) -> Response:
            if (denied := authorized(request)) is not None:
                return denied
            data = self.uploads.pop(request.path_params["upload"]) + await request.body()
            digest = request.query_params.get("digest", "")
            if digest_of(data) != digest:
                return JSONResponse({"errors": [{"code": "DIGEST_INVALID"}]}, status_code=400)
            self.blobs[digest] = data
            self.pushed.append(digest)
            return Response(status_code=201, headers={"Docker-Content-Digest": digest})

        async def put_manifest(request: Request) -> Response:
            if (denied := authorized(request)) is not None:
                return denied
            p = request.path_params
            data = await request.body()
            missing = [d for d in _digests(data) if d not in self.blobs]
            if missing:
                return JSONResponse({"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "detail": missing}]}, status_code=400)
            self.manifests[(p["namespace"], p["model"], p["tag"])] = data
            return Response(status_code=201)

        async def cdn(request: Request) -> Response:
            digest = request.path_params["digest"]
            self.blob_gets[digest] += 1
            data = self.blobs[digest]
            if digest in self.corrupt:
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            start = 0
            rng = request.headers.get("range")
            if rng:
                self.ranges.append(rng)
                start = int(rng.removeprefix("bytes=").split("-")[0])
            body = data[start:]
            cut = digest in self.cut_once
            self.cut_once.discard(digest)

            async def chunks() -> AsyncIterator[bytes]:
                step = 1 << 16
                end = len(body) // 2 if cut else len(body)
                for i in range(0, end, step):
                    yield body[i : min(i + step, end)]
                if cut:
                    raise ConnectionResetError("the double cuts this transfer half-way")

            headers = {"Content-Length": str(len(body))}
            if rng:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return StreamingResponse(chunks(), status_code=206 if rng else 200, headers=headers,
                                     media_type="application/octet-stream")  # fmt: skip

        return Starlette(
            routes=[
                Route("/token", token),
                Route("/v2/{namespace}/{model}/manifests/{tag}", manifest, methods=["GET"]),
                Route("/v2/{namespace}/{model}/manifests/{tag}", put_manifest, methods=["PUT"]),
                Route("/v2/{namespace}/{model}/blobs/uploads/", start_upload, methods=["POST"]),
                Route("/v2/{namespace}/{model}/blobs/uploads/{upload}", finish_upload, methods=["PUT"]),
                Route("/v2/{namespace}/{model}/blobs/{digest}", blob, methods=["GET", "HEAD"]),
                Route("/cdn/{digest}", cdn),
            ]
        )


def _digests(manifest: bytes) -> list[str]:
    body = json.loads(manifest)
    return [body["config"]["digest"], *(layer["digest"] for layer in body.get("layers", []))]
