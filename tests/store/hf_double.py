"""A test double of the Hugging Face Hub endpoints huggingface_hub calls (reached through HF_ENDPOINT):
a repo's info with its files' sizes and LFS sha256, and each file's HEAD and GET under /resolve/."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

COMMIT = "c0ffee" + "0" * 34  # a 40-hex commit id, as the Hub's


@dataclass
class HubDouble:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # "org/repo" -> {file: bytes}
    corrupt: set[tuple[str, str]] = field(default_factory=set)  # (repo, file) served with wrong bytes
    gets: Counter[str] = field(default_factory=Counter)  # "org/repo/file" -> GETs

    def add_folder(self, repo: str, folder: Path) -> None:
        self.repos[repo] = {
            str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }

    def app(self) -> Starlette:
        async def info(request: Request) -> Response:
            repo = f"{request.path_params['org']}/{request.path_params['repo']}"
            files = self.repos.get(repo)
            if files is None:
                return JSONResponse({"error": "Repository not found"}, status_code=404,
                                    headers={"X-Error-Code": "RepoNotFound"})  # fmt: skip
            siblings = [
                {"rfilename": name, "size": len(data),
                 "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                for name, data in files.items()
            ]  # fmt: skip
            return JSONResponse({"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})

        async def resolve(request: Request) -> Response:
            p = request.path_params
            repo, name = f"{p['org']}/{p['repo']}", p["path"]
            data = self.repos.get(repo, {}).get(name)
            if data is None:
                return JSONResponse(
                    {"error": "Entry not found"}, status_code=404, headers={"X-Error-Code": "EntryNotFound"}
                )
            sha = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                       "X-Linked-Size": str(len(data)), "Content-Length": str(len(data))}  # fmt: skip
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers)
            self.gets[f"{repo}/{name}"] += 1
            if (repo, name) in self.corrupt:
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            return Response(data, headers=headers, media_type="application/octet-stream")

        return Starlette(
            routes=[
                Route("/api/models/{org}/{repo}", info),
                Route("/api/models/{org}/{repo}/revision/{rev}", info),
                Route("/{org}/{repo}/resolve/{rev}/{path:path}", resolve, methods=["GET", "HEAD"]),
            ]
        )
