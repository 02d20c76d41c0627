"""Pulling from Hugging Face: `hf.co/{org}/{repo}[:{quant}]` (also `huggingface.co/...`), as upstream
names them. A repo with GGUF files gives the one matching the tag (`Q4_K_M`, `q8_0`; case does not
matter; by default Q4_K_M when there is one, else the first in name order); a repo of safetensors
gives its config, tokenizer and weights. Files come through huggingface_hub, so HF_ENDPOINT and
HF_TOKEN are honoured and its cache is reused; each LFS file is checked against the sha256 the Hub
lists for it as it is copied into the store's blobs, then the model is created from those blobs
(as /api/create from uploaded files is)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from tp_ollama.errors import ModelNotFound, TpOllamaError
from tp_ollama.store.names import DEFAULT_TAG, ModelName

HOSTS = ("hf.co", "huggingface.co")
DEFAULT_QUANT = "Q4_K_M"
# The files of a safetensors repo worth fetching (at its top level): what an HF directory in the store keeps.
SAFETENSORS_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]


class HubError(TpOllamaError):
    """A Hugging Face pull that cannot go on; the message names the repo and the file."""


def is_hub(name: ModelName) -> bool:
    return name.host.casefold() in HOSTS


def pick_gguf(files: list[str], tag: str) -> str | None:
    """The GGUF file of `files` that `tag` names (a quantization, matched as a whole word of the file
    name, any case); for the default tag Q4_K_M, else the first. Split GGUFs (-00001-of-00003) are
    not taken."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and not re.search(r"-\d{5}-of-\d{5}\.gguf$", f))
    if not ggufs:
        return None
    want = DEFAULT_QUANT if tag.casefold() == DEFAULT_TAG else tag
    pattern = re.compile(rf"(^|[^A-Za-z0-9_]){re.escape(want)}([^A-Za-z0-9_]|$)", re.IGNORECASE)
    matches = [f for f in ggufs if pattern.search(Path(f).name)]
    if matches:
        return matches[0]
    return ggufs[0] if tag.casefold() == DEFAULT_TAG else None


def fetch(name: ModelName, layer: Callable[[str, int, int], None]) -> dict[str, tuple[Path, str]]:
    """Download what `name` needs into huggingface_hub's cache: the GGUF file, or a safetensors repo's
    top-level config, tokenizer and weight files, as {file name: (its path in the cache, the sha256
    digest the Hub lists for it, "" for a small file kept in git)}. The digests are checked as the
    files are copied into the store (see `drop_cached` for a file that fails). `layer` hears each LFS
    file's (digest, total, completed)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo = f"{name.namespace}/{name.model}"
    # Read at each pull (huggingface_hub reads them once, at its import).
    endpoint, cache = os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_HUB_CACHE") or None
    api = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None)
    try:
        info = api.model_info(repo, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelNotFound(name.display, f"pull model manifest: {api.endpoint} has no repository {repo}") from None
    except HfHubHTTPError as e:
        raise HubError(f"pulling {name.display}: {api.endpoint}: {e}") from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    gguf = pick_gguf(list(siblings), name.tag)
    try:
        if gguf is not None:
            size, digest = int(siblings[gguf].size or 0), _digest(siblings[gguf])
            if digest:
                layer(digest, size, 0)
            path = Path(hf_hub_download(repo, gguf, revision=info.sha, endpoint=api.endpoint, cache_dir=cache,
                                        token=api.token))  # fmt: skip
            if digest:
                layer(digest, size, size)
            return {Path(gguf).name: (path, digest)}
        if any(f.lower().endswith(".gguf") for f in siblings):
            choices = ", ".join(sorted(f for f in siblings if f.lower().endswith(".gguf")))
            raise HubError(f"pulling {name.display}: no GGUF file of {repo} matches {name.tag!r}: {choices}")
        if not any(f.endswith(".safetensors") for f in siblings) or "config.json" not in siblings:
            raise HubError(f"pulling {name.display}: {repo} has neither a GGUF file nor config.json and safetensors")
        wanted = sorted(f for f in siblings if "/" not in f and any(fnmatch(f, p) for p in SAFETENSORS_PATTERNS))
        files = {}
        for rel in wanted:
            local = Path(hf_hub_download(repo, rel, revision=info.sha, endpoint=api.endpoint, cache_dir=cache,
                                         token=api.token))  # fmt: skip
            files[rel] = (local, _digest(siblings[rel]))
            if files[rel][1]:
                layer(files[rel][1], local.stat().st_size, local.stat().st_size)
        return files
    except HfHubHTTPError as e:
        raise HubError(f"pulling {name.display}: {api.endpoint}: {e}") from None


def _digest(sibling: Any) -> str:
    """`sha256:<hex>` of an LFS file as the Hub lists it ("" for a small file kept in git)."""
    lfs = getattr(sibling, "lfs", None)
    sha = getattr(lfs, "sha256", None) if lfs is not None else None
    return f"sha256:{sha}" if sha else ""


def drop_cached(path: Path) -> None:
    """Remove a downloaded file from huggingface_hub's cache (its blob and its snapshot link), so that
    the next pull fetches it again."""
    for bad in {path.resolve(), path}:
        bad.unlink(missing_ok=True)
