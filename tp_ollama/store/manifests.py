"""The bytes of Ollama's model layout: media types, layers, manifests (Docker v2 manifest JSON, whose
sha256 is the model's digest), the config blob, digests, and blob files that are always complete."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from tp_ollama.errors import CheckpointError, RequestError
from tp_ollama.store.names import ModelName

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"
PROMPT = "application/vnd.ollama.image.prompt"  # legacy name of the template layer
SYSTEM = "application/vnd.ollama.image.system"
PARAMS = "application/vnd.ollama.image.params"
MESSAGES = "application/vnd.ollama.image.messages"
LICENSE = "application/vnd.ollama.image.license"
HF_FILE = "application/vnd.tp-ollama.hf.file"

# The files of an HF directory worth storing: weights, configs, tokenizers, chat templates.
# Other weight formats (*.bin, *.pth) and subdirectories (`original/`) are left out.
HF_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".tiktoken")
DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
COPY_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelDetails:
    """/api/tags and /api/show `details`; from the config blob."""

    parent_model: str = ""
    format: str = ""  # "gguf" | "safetensors"
    family: str = ""
    families: tuple[str, ...] = ()
    parameter_size: str = ""  # "268.10M", "1.2B"
    quantization_level: str = ""  # "Q4_K_M", "F16", "BF16"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "families": list(self.families)}


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    from_: str = ""  # the model it was taken from (upstream's `from`)
    name: str = ""  # relative file name, for HF_FILE layers

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_:
            d["from"] = self.from_
        if self.name:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]

    def to_bytes(self) -> bytes:
        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        return (json.dumps(body, separators=(",", ":")) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: object) -> Manifest:
        try:
            body = json.loads(data)

            def layer(d: Mapping[str, Any]) -> Layer:
                return Layer(d["mediaType"], d["digest"], int(d["size"]), d.get("from", ""), d.get("name", ""))

            return cls(layer(body["config"]), tuple(layer(d) for d in body.get("layers") or []))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: not a valid manifest ({e!r})") from e

    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}


@dataclass(frozen=True)
class Found:
    """A manifest installed (or embedded) under a name."""

    name: ModelName  # installed casing
    manifest: Manifest
    digest: str
    modified_at: datetime


def config_bytes(details: ModelDetails, layers: Sequence[Layer]) -> bytes:
    """The config blob: upstream's ConfigV2 fields for details, plus the layer digests."""
    config = {
        "model_format": details.format,
        "model_family": details.family,
        "model_families": list(details.families),
        "model_type": details.parameter_size,
        "file_type": details.quantization_level,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    return (json.dumps(config, separators=(",", ":")) + "\n").encode()


def config_details(config_blob: bytes, layers: Sequence[Layer]) -> ModelDetails:
    """The details a config blob holds; the parent model is the one its weights were taken from."""
    config = json.loads(config_blob)
    weights = [x for x in layers if x.media_type in (MODEL, HF_FILE)]
    return ModelDetails(
        parent_model=weights[0].from_ if weights else "",
        format=config.get("model_format") or "",
        family=config.get("model_family") or "",
        families=tuple(config.get("model_families") or ()),
        parameter_size=config.get("model_type") or "",
        quantization_level=config.get("file_type") or "",
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> hex; RequestError `invalid digest format` otherwise."""
    m = DIGEST.fullmatch(digest)
    if m is None:
        raise RequestError("invalid digest format")
    return m.group(1)


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)


# Moves a complete blob file into place: (the file, "sha256:<hex>", pin) -> True when the blob is new.
PlaceBlob = Callable[[Path, str, bool], bool]


class BlobWriter:
    """Writes one blob: bytes go to a temporary file in `directory`, hashed on the way; `commit` checks
    the digest (when one was expected) and hands the file to `place`, so a blob file is always complete."""

    def __init__(self, directory: Path, expected_hex: str | None, place: PlaceBlob) -> None:
        self._place = place
        self._expected = expected_hex
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest = ""
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".partial-")
        self._tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write after commit or abort"
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Drop the bytes written so far (a download that must start over)."""
        assert self._file is not None, "restart after commit or abort"
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.size = 0

    def commit(self, pin: bool = False) -> bool:
        """Move the bytes into place; True when the blob is new. A digest mismatch is a RequestError
        with upstream's message. `pin` keeps the blob from pruning until the store unpins it."""
        assert self._file is not None, "commit after commit or abort"
        self._file.close()
        self._file = None
        got = self._hash.hexdigest()
        if self._expected is not None and got != self._expected:
            self._tmp.unlink(missing_ok=True)
            raise RequestError(f'digest mismatch, expected "sha256:{self._expected}", got "sha256:{got}"')
        self.digest = f"sha256:{got}"
        return self._place(self._tmp, self.digest, pin)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
