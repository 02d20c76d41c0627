"""The model store, in Ollama's on-disk layout so that either server can read it:

    manifests/<host>/<namespace>/<model>/<tag>   Docker v2 manifest JSON (its sha256 is the model's digest)
    blobs/sha256-<hex>                           content-addressed layers and config blobs
    tp-ollama/                                   ours: HF directory views, file facts, hidden names

Decisions beyond what upstream does:
* A Hugging Face directory is stored like everything else: each file (config.json, tokenizer files,
  *.safetensors) becomes a blob, listed in the manifest as a layer of our own media type
  `application/vnd.tp-ollama.hf.file` that carries its relative `name`. Loading needs a directory,
  so `resolve` builds `tp-ollama/hf/<id>/` once: relative symlinks to the blobs, as the HF hub cache
  does. The store owns the bytes, /api/blobs uploads work for HF models as for GGUF, and an upstream
  reader sharing the directory skips a layer type it does not know.
* The embedded models (tp_ollama.store.embedded) are listed without a pull as virtual entries: the
  manifest lives in memory, its model layer's digest is the package file's real sha256 (hashed once
  per machine, remembered by path, size and mtime in tp-ollama/files.json), and a layer whose blob is
  missing but whose digest is an embedded file's resolves to that file. A copy of one, or a model
  created FROM one, costs a manifest and a config blob, never the weights.
* Deleting an embedded model hides it, as `ollama rm` users expect (it leaves the list);
  `restore_embedded(name)` brings it back, which is what pulling that name should call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from math import isfinite, prod
from pathlib import Path
from typing import IO, Any

from tp_ollama.errors import CheckpointError, ModelNotFound, RequestError, TpOllamaError
from tp_ollama.store.embedded import EMBEDDED
from tp_ollama.store.modelfile import (
    MESSAGE_ROLES,
    coerce_parameters,
    format_parameters,
    parse_modelfile,
    render_modelfile,
)
from tp_ollama.store.names import ModelName, parse_name

log = logging.getLogger(__name__)

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
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
_COPY_CHUNK = 1 << 22
Progress = Callable[[str], None]


# --- what callers get --------------------------------------------------------------------------------


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
class ModelEntry:
    """One /api/tags row. `digest` is the sha256 hex of the manifest bytes."""

    name: str
    model: str
    modified_at: datetime
    size: int
    digest: str
    details: ModelDetails

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "modified_at": self.modified_at.isoformat(),
            "size": self.size,
            "digest": self.digest,
            "details": self.details.to_dict(),
        }


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to serve a model. `path` is a GGUF file or an HF directory; `template` is the
    TEMPLATE layer (None: use the checkpoint's own chat template)."""

    name: str
    path: Path
    format: str
    template: str | None
    system: str | None
    params: dict[str, Any]
    messages: list[dict[str, str]]
    license: list[str]
    details: ModelDetails
    digest: str
    modified_at: datetime


# --- manifests ---------------------------------------------------------------------------------------


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
class _Found:
    name: ModelName  # installed casing
    manifest: Manifest
    digest: str
    modified_at: datetime


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> hex; RequestError `invalid digest format` otherwise."""
    m = _DIGEST.fullmatch(digest)
    if m is None:
        raise RequestError("invalid digest format")
    return m.group(1)


def human_number(n: int) -> str:
    """Upstream's format.HumanNumber: 268098176 -> 268.10M, 3212749888 -> 3.2B, 8e9 -> 8B."""
    if n >= 1_000_000_000:
        v = n / 1e9
        return f"{v:.0f}B" if v.is_integer() else f"{v:.1f}B"
    if n >= 1_000_000:
        v = n / 1e6
        return f"{v:.0f}M" if v.is_integer() else f"{v:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _children(directory: Path) -> list[Path]:
    """Sorted entries of a directory; none when it is not one (or vanished meanwhile)."""
    try:
        return sorted(directory.iterdir())
    except (NotADirectoryError, FileNotFoundError):
        return []


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)


# --- blobs -------------------------------------------------------------------------------------------


class BlobWriter:
    """Writes one blob: bytes go to a temporary file beside the blobs, hashed on the way; `commit`
    checks the digest (when one was expected) and renames, so a blob file is always complete."""

    def __init__(self, store: ModelStore, expected_hex: str | None) -> None:
        self._store = store
        self._expected = expected_hex
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest = ""
        store.blobs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=store.blobs, prefix=".partial-")
        self._tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write after commit or abort"
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

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
        with self._store._lock:
            target = self._store.blob_path(self.digest)
            created = not target.exists()
            if created:
                os.replace(self._tmp, target)
            else:
                self._tmp.unlink(missing_ok=True)
            if pin:
                self._store._pins[self.digest] += 1
        return created

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


# --- facts about files we did not write: hashes and details, remembered across runs ------------------


class _FileFacts:
    """sha256 and details of outside files (the embedded GGUFs, FROM paths) keyed by path, size and
    mtime, so that a listing never hashes 250 MB again. A cache: unreadable or stale entries are
    recomputed, and a store root that is not writable just means no persistence."""

    FORMAT = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            try:
                body = json.loads(self.path.read_text())
                ok = isinstance(body, dict) and body.get("format") == self.FORMAT
                self._entries = body["files"] if ok else {}
            except (OSError, ValueError, KeyError):
                self._entries = {}
        return self._entries

    def _entry(self, file: Path) -> dict[str, Any]:
        """The entry for `file`; a fresh one when the file changed or was never seen."""
        st = file.stat()
        key = str(file.resolve())
        entry = self._load().get(key)
        if entry is None or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            self._load()[key] = entry
        return entry

    def known_sha256(self, file: Path) -> str | None:
        with self._lock:
            entry = self._entry(file)
            return entry.get("sha256")

    def remember_sha256(self, file: Path, hex_digest: str) -> None:
        with self._lock:
            entry = self._entry(file)
            entry["sha256"] = hex_digest
            self._save()

    def describe(self, file: Path) -> tuple[str, ModelDetails]:
        """(sha256 hex, details) of a checkpoint file, computed once."""
        with self._lock:
            entry = self._entry(file)
            if "sha256" not in entry or "details" not in entry:
                entry["sha256"] = _hash_file(file)
                entry["details"] = inspect_checkpoint(file).to_dict()
                self._save()
            d = entry["details"]
            return entry["sha256"], ModelDetails(**{**d, "families": tuple(d["families"])})

    def _save(self) -> None:
        try:
            _atomic_write(self.path, json.dumps({"format": self.FORMAT, "files": self._load()}).encode())
        except OSError as e:
            log.warning("cannot save %s (%s); file hashes will be recomputed next run", self.path, e)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- what a checkpoint says about itself ---------------------------------------------------------------


def _gguf_arch_names() -> dict[str, str]:
    """HF model_type -> GGUF architecture, so that a safetensors Gemma 3 is family `gemma3` too."""
    from tp_ollama.checkpoints.gguf_checkpoint import ARCHITECTURES

    return {hf: arch for arch, hf in ARCHITECTURES.items()}


_HF_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def inspect_checkpoint(path: Path) -> ModelDetails:
    """format, family, parameter size and quantization of a GGUF file or HF directory."""
    from tp_ollama.checkpoints.gguf_checkpoint import GGUFCheckpoint
    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.checkpoints.safetensors_dir import SafetensorsCheckpoint

    ckpt = open_checkpoint(path)
    try:
        if isinstance(ckpt, GGUFCheckpoint):
            family = str(ckpt.arch)
            tensors = ckpt.file.tensors.values()
            count = sum(prod(t.shape) for t in tensors)
            file_type = ckpt.file.metadata.get("general.file_type")
            if isinstance(file_type, int):
                quant = _file_type_name(file_type)
            else:  # no general.file_type: name the type that holds most of the weights
                by_type: Counter[str] = Counter()
                for t in tensors:
                    by_type[t.ggml_type] += prod(t.shape)
                quant = by_type.most_common(1)[0][0] if by_type else "unknown"
        elif isinstance(ckpt, SafetensorsCheckpoint):
            model_type = ckpt.config.model_type
            family = _gguf_arch_names().get(model_type, model_type)
            count = sum(prod(ckpt.shape(n)) for n in ckpt.names())
            quant = _hf_quantization(ckpt.hf_config)
        else:
            raise CheckpointError(f"{path}: unsupported checkpoint kind {type(ckpt).__name__}")
        return ModelDetails(
            format=ckpt.format,
            family=family,
            families=(family,),
            parameter_size=human_number(count),
            quantization_level=quant,
        )
    finally:
        ckpt.close()


def _file_type_name(value: int) -> str:
    """GGUF general.file_type -> Ollama's name: 15 -> Q4_K_M, 1 -> F16, 0 -> F32."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return "unknown"


def _hf_quantization(config: Mapping[str, Any]) -> str:
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        return str(quant["quant_method"]).upper()
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return _HF_DTYPES.get(str(dtype), str(dtype).upper())


def checkpoint_info(path: Path, verbose: bool = False) -> tuple[dict[str, Any], str | None]:
    """(/api/show model_info, the checkpoint's own chat template or None).

    GGUF: the metadata minus general.name and tokenizer.chat_template, arrays longer than 5 shown as
    [] unless `verbose`, plus general.parameter_count. HF: the config mapped onto the same keys."""
    from tp_ollama.checkpoints.chat_template import BUILTIN_CHAT_TEMPLATES
    from tp_ollama.checkpoints.gguf_checkpoint import CONFIG_KEYS, GGUFCheckpoint
    from tp_ollama.checkpoints.gguf_file import GGUFArray
    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.checkpoints.safetensors_dir import SafetensorsCheckpoint
    from tp_ollama.checkpoints.tokenizer import Tokenizer

    ckpt = open_checkpoint(path)
    try:
        info: dict[str, Any] = {}
        template: str | None = None
        if isinstance(ckpt, GGUFCheckpoint):
            meta = ckpt.file.metadata
            for key, value in meta.items():
                if key in ("general.name", "tokenizer.chat_template"):
                    continue
                if isinstance(value, GGUFArray | list) and (verbose or len(value) <= 5):
                    value = ckpt.file.array(key) if isinstance(value, GGUFArray) else value
                    value = value.tolist() if hasattr(value, "tolist") else list(value)
                elif isinstance(value, GGUFArray | list):
                    value = []
                info[key] = value
            info["general.parameter_count"] = sum(prod(t.shape) for t in ckpt.file.tensors.values())
            template = meta.get("tokenizer.chat_template") or BUILTIN_CHAT_TEMPLATES.get(str(ckpt.arch))
        elif isinstance(ckpt, SafetensorsCheckpoint):
            arch = _gguf_arch_names().get(ckpt.config.model_type, ckpt.config.model_type)
            info["general.architecture"] = arch
            info["general.parameter_count"] = sum(prod(ckpt.shape(n)) for n in ckpt.names())
            for suffix, hf_key in CONFIG_KEYS.items():
                value = ckpt.hf_config.get(hf_key)
                if isinstance(value, int | float) and not isinstance(value, bool) and isfinite(value):
                    info[f"{arch}.{suffix}"] = value
            try:
                template = Tokenizer.from_hf_dir(path).chat_template
            except CheckpointError:
                template = None
        return info, template
    finally:
        ckpt.close()


def capabilities(template: str | None) -> list[str]:
    """`completion`, plus `tools` / `insert` when the template reads tools / a suffix (upstream looks
    at the template's variables the same way), and `thinking` when it reads `.Think` (Go) or
    `enable_thinking`, or writes `<think>` (Jinja)."""
    from tp_ollama.checkpoints.chat_template import template_features

    names: set[str] = set()
    for block in re.findall(r"\{\{.*?\}\}|\{%.*?%\}", template or "", flags=re.S):
        names.update(w.lower() for w in re.findall(r"[A-Za-z_]\w*", block))
    caps = ["completion"]
    if "tools" in names:
        caps.append("tools")
    if "suffix" in names:
        caps.append("insert")
    if "think" in names or (template is not None and template_features(template).thinking):
        caps.append("thinking")
    return caps


# --- the store ---------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """Layers of a model being created, and its details."""

    layers: list[Layer] = field(default_factory=list)
    details: ModelDetails = field(default_factory=ModelDetails)
    pinned: list[str] = field(default_factory=list)  # digests held against pruning meanwhile
    created: list[str] = field(default_factory=list)  # blobs this create wrote, pruned if it fails


class ModelStore:
    """Models under `root` ($OLLAMA_MODELS, `~/.ollama/models` by default; the caller resolves it).

    Thread-safe for one server process: changes (create, copy, delete, blob commits) hold a lock for
    their short critical sections only, and digests a create is still assembling are pinned so that a
    concurrent delete cannot prune them. Reads need no lock: every file is replaced atomically."""

    def __init__(self, root: Path, *, facts_path: Path | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.own = self.root / "tp-ollama"
        self._facts = _FileFacts(facts_path or self.own / "files.json")
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()
        self._virtual_blobs: dict[str, bytes] = {}  # config blobs of embedded entries
        self._embedded_files: dict[str, Path] = {}  # model-layer digest -> the package's GGUF
        self._virtual_cache: dict[str, tuple[tuple[str, int, int], _Found]] = {}

    # --- blobs -----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{digest_hex(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_writer(self, digest: str | None = None) -> BlobWriter:
        """A writer for a blob whose digest is `digest` (checked on commit), or any content if None."""
        return BlobWriter(self, digest_hex(digest) if digest is not None else None)

    def add_blob(self, digest: str, data: bytes | IO[bytes] | Iterable[bytes]) -> bool:
        """Store `data` as blob `digest` (/api/blobs POST); True when it is new (201), False when it was
        there (200); RequestError on a malformed digest or a mismatch (400)."""
        with self.blob_writer(digest) as w:
            if isinstance(data, bytes | bytearray | memoryview):
                w.write(bytes(data))
            elif hasattr(data, "read"):
                while chunk := data.read(_COPY_CHUNK):
                    w.write(chunk)
            else:
                for chunk in data:
                    w.write(chunk)
            return w.commit()

    def _put_bytes(self, data: bytes, draft: _Draft) -> tuple[str, bool]:
        with self.blob_writer() as w:
            w.write(data)
            created = w.commit(pin=True)
        draft.pinned.append(w.digest)
        if created:
            draft.created.append(w.digest)
        return w.digest, created

    def _read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            if digest in self._virtual_blobs:
                return self._virtual_blobs[digest]
            raise CheckpointError(f"blob {digest} is missing from {self.blobs}") from None

    def _layer_file(self, layer: Layer) -> Path:
        """A layer's bytes on disk: its blob, or the embedded package file with that digest."""
        path = self.blob_path(layer.digest)
        if path.is_file():
            return path
        if self._is_embedded(layer.digest):
            return self._embedded_files[layer.digest]
        raise CheckpointError(f"blob {layer.digest} is missing from {self.blobs}")

    def _is_embedded(self, digest: str) -> bool:
        if digest not in self._embedded_files:
            self._all_virtual()  # a fresh process learns the embedded digests here
        return digest in self._embedded_files

    # --- manifests -------------------------------------------------------------------------------

    def _walk(self) -> Iterator[tuple[ModelName, Path]]:
        """Every manifest file as (name with its installed casing, path); invalid names skipped."""
        for host in _children(self.manifests):
            for ns in _children(host):
                for model in _children(ns):
                    for tag in _children(model):
                        try:
                            name = parse_name(f"{host.name}/{ns.name}/{model.name}:{tag.name}")
                        except TpOllamaError:
                            continue
                        if tag.is_file():
                            yield name, tag

    def _find_manifest(self, name: ModelName) -> tuple[ModelName, Path] | None:
        """The installed manifest for `name`, matching each part case-insensitively."""
        exact = self.root / name.manifest_path
        if exact.is_file():
            return name, exact
        here, parts = self.manifests, []
        for part in name.parts:
            try:
                match = next((e.name for e in os.scandir(here) if e.name.casefold() == part.casefold()), None)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if match is None:
                return None
            parts.append(match)
            here = here / match
        return (ModelName(*parts), here) if here.is_file() else None

    def _read_found(self, name: ModelName, path: Path) -> _Found:
        data = path.read_bytes()
        return _Found(name, Manifest.parse(data, path), _sha256(data), _mtime(path.stat()))

    def _lookup(self, text: str, message: str | None = None) -> _Found:
        name = parse_name(text)
        found = self._find_manifest(name)
        if found is not None:
            try:
                return self._read_found(*found)
            except FileNotFoundError:
                pass  # deleted meanwhile
        embedded = self._embedded_name(name)
        if embedded is not None and embedded not in self._hidden():
            return self._virtual(embedded)
        raise ModelNotFound(text, message)

    def _details(self, found: _Found) -> ModelDetails:
        config = json.loads(self._read_blob(found.manifest.config.digest))
        weights = [x for x in found.manifest.layers if x.media_type in (MODEL, HF_FILE)]
        return ModelDetails(
            parent_model=weights[0].from_ if weights else "",
            format=config.get("model_format") or "",
            family=config.get("model_family") or "",
            families=tuple(config.get("model_families") or ()),
            parameter_size=config.get("model_type") or "",
            quantization_level=config.get("file_type") or "",
        )

    def _entry(self, found: _Found) -> ModelEntry:
        m = found.manifest
        return ModelEntry(
            name=found.name.display,
            model=found.name.display,
            modified_at=found.modified_at,
            size=m.config.size + sum(layer.size for layer in m.layers),
            digest=found.digest,
            details=self._details(found),
        )

    # --- embedded models -------------------------------------------------------------------------

    @staticmethod
    def _embedded_name(name: ModelName) -> str | None:
        return next((e for e in EMBEDDED if parse_name(e) == name), None)

    def _hidden(self) -> set[str]:
        try:
            return set(json.loads((self.own / "hidden-embedded.json").read_text()))
        except (OSError, ValueError, TypeError):
            return set()

    def _set_hidden(self, hidden: set[str]) -> None:
        _atomic_write(self.own / "hidden-embedded.json", json.dumps(sorted(hidden)).encode())

    def _virtual(self, embedded: str) -> _Found:
        """The in-memory manifest of an embedded model; CheckpointError when its package is missing."""
        path = EMBEDDED[embedded]()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        cached = self._virtual_cache.get(embedded)
        if cached is not None and cached[0] == key:
            return cached[1]
        sha, details = self._facts.describe(path)
        model = Layer(MODEL, f"sha256:{sha}", st.st_size)
        config_bytes = _config_bytes(details, [model])
        manifest = Manifest(Layer(CONFIG_TYPE, f"sha256:{_sha256(config_bytes)}", len(config_bytes)), (model,))
        found = _Found(parse_name(embedded), manifest, _sha256(manifest.to_bytes()), _mtime(st))
        self._virtual_blobs[manifest.config.digest] = config_bytes
        self._embedded_files[model.digest] = path
        self._virtual_cache[embedded] = (key, found)
        return found

    def _all_virtual(self) -> list[_Found]:
        out = []
        for embedded in EMBEDDED:
            try:
                out.append(self._virtual(embedded))
            except TpOllamaError as e:
                log.warning("embedded model %s is unavailable: %s", embedded, e)
        return out

    def restore_embedded(self, name: str) -> bool:
        """Undo the deletion of an embedded model (call it when that name is pulled); False when the
        name is not an embedded model."""
        embedded = self._embedded_name(parse_name(name))
        if embedded is None:
            return False
        with self._lock:
            hidden = self._hidden()
            if embedded in hidden:
                self._set_hidden(hidden - {embedded})
        return True

    # --- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Display names of the listed models (the front end's ModelResolver, for /v1/models)."""
        return [entry.name for entry in self.list()]

    def list(self) -> list[ModelEntry]:
        """Installed models and the visible embedded ones, newest first (/api/tags)."""
        entries: dict[ModelName, ModelEntry] = {}
        for name, path in self._walk():
            try:
                entries[name] = self._entry(self._read_found(name, path))
            except FileNotFoundError:
                continue
            except (TpOllamaError, ValueError) as e:
                log.warning("skipping %s: %s", path, e)
        hidden = self._hidden()
        for found in self._all_virtual():
            if found.name not in entries and found.name.display not in hidden:
                entries[found.name] = self._entry(found)
        return sorted(entries.values(), key=lambda e: e.modified_at, reverse=True)

    def resolve(self, name: str) -> ResolvedModel:
        """What serving `name` needs; ModelNotFound (`model 'NAME' not found`) when it is not here."""
        found = self._lookup(name)
        model: Layer | None = None
        hf: list[Layer] = []
        texts: dict[str, str] = {}
        params: dict[str, Any] = {}
        messages: list[dict[str, str]] = []
        licenses: list[str] = []
        for layer in found.manifest.layers:
            kind = layer.media_type
            if kind == MODEL:
                model = layer
            elif kind == HF_FILE:
                hf.append(layer)
            elif kind in (TEMPLATE, PROMPT, SYSTEM):
                texts[SYSTEM if kind == SYSTEM else TEMPLATE] = self._read_blob(layer.digest).decode()
            elif kind == PARAMS:
                params = json.loads(self._read_blob(layer.digest))
            elif kind == MESSAGES:
                messages = json.loads(self._read_blob(layer.digest))
            elif kind == LICENSE:
                licenses.append(self._read_blob(layer.digest).decode())
        if hf:
            path, fmt = self._hf_view(hf), "safetensors"
        elif model is not None:
            path, fmt = self._layer_file(model), "gguf"
        else:
            raise CheckpointError(f"model '{found.name.display}' has no weights layer")
        return ResolvedModel(
            name=found.name.display,
            path=path,
            format=fmt,
            template=texts.get(TEMPLATE),
            system=texts.get(SYSTEM),
            params=params,
            messages=messages,
            license=licenses,
            details=self._details(found),
            digest=found.digest,
            modified_at=found.modified_at,
        )

    def manifest(self, name: str, message: str | None = None) -> Manifest:
        """The manifest `name` resolves to (layers with digests and sizes; read-only, for /api/pull and
        /api/push); ModelNotFound with `message` (default `model 'NAME' not found`) when it is not here."""
        return self._lookup(name, message).manifest

    def show(self, name: str, verbose: bool = False) -> dict[str, Any]:
        """The /api/show body. `template` falls back to the checkpoint's own chat template when the
        model has no TEMPLATE layer (the modelfile then has no TEMPLATE line)."""
        r = self.resolve(name)
        model_info, chat_template = checkpoint_info(r.path, verbose)
        template = r.template if r.template is not None else chat_template
        show: dict[str, Any] = {
            "modelfile": render_modelfile(
                name=r.name,
                from_=str(r.path),
                template=r.template,
                system=r.system,
                parameters=r.params,
                license=r.license,
                messages=r.messages,
            ),
            "parameters": format_parameters(r.params),
            "template": template or "",
            "system": r.system or "",
            "license": "\n".join(r.license),
            "details": r.details.to_dict(),
            "messages": r.messages,
            "model_info": model_info,
            "capabilities": capabilities(template),
            "modified_at": r.modified_at.isoformat(),
        }
        # upstream omits empty fields (omitempty); model_info is always there
        return {k: v for k, v in show.items() if v or k == "model_info"}

    def _hf_view(self, layers: Sequence[Layer]) -> Path:
        """A directory of relative symlinks to the blobs of an HF model, built once and reused."""
        listing = sorted((layer.name, layer.digest) for layer in layers)
        view = self.own / "hf" / _view_id(layers)
        if view.is_dir():
            return view
        view.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=view.parent, prefix=".tmp-"))
        try:
            for rel, digest in listing:
                blob = self._layer_file(Layer(HF_FILE, digest, 0))
                link = tmp / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, (view / rel).parent))
            os.rename(tmp, view)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not view.is_dir():  # not just a concurrent builder that won the rename
                raise
        return view

    # --- changing ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        from_: str | Path | None = None,
        *,
        files: Mapping[str, str] | None = None,
        system: str | None = None,
        template: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        license: str | Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> ModelEntry:
        """Create (or replace) model `name`, as /api/create does.

        The weights come from `files` ({relative name: blob digest}: one GGUF, or an HF directory's
        files), or `from_`: a Path (a GGUF file, copied into the blobs, or an HF directory, whose files
        are), `@sha256:<hex>` (an uploaded GGUF blob), or a model name (its layers are reused). Then
        `template` and `system` replace the base's, `license` texts are added to its, `parameters` are
        merged over its (new keys win) and non-empty `messages` replace its. `progress` receives
        upstream's status lines, ending with "success"."""
        say = progress or (lambda status: None)
        target = parse_name(name)
        params = coerce_parameters(parameters or {})
        msgs = _check_messages(messages or [])
        licenses = [license] if isinstance(license, str) else list(license or [])
        if from_ is None and not files:
            raise RequestError("neither 'from' or 'files' was specified")
        say("gathering model components")
        draft = _Draft()
        done = False
        try:
            if files:
                self._add_files(draft, files, say)
            elif isinstance(from_, Path):
                self._add_path(draft, from_, say)
            elif isinstance(from_, str) and from_.startswith("@"):
                self._add_files(draft, {"model.gguf": from_[1:]}, say)
            else:
                self._add_model(draft, str(from_))
            self._apply(draft, template, system, licenses, params, msgs, say)
            config_bytes = _config_bytes(draft.details, draft.layers)
            config_digest, _ = self._put_bytes(config_bytes, draft)
            manifest = Manifest(Layer(CONFIG_TYPE, config_digest, len(config_bytes)), tuple(draft.layers))
            say("writing manifest")
            self._write_manifest(target, manifest.to_bytes())
            done = True
        finally:
            with self._lock:
                self._unpin(draft.pinned)
                if not done:
                    self._prune(set(draft.created))
        say("success")
        return self._entry(self._lookup(target.full))

    def create_from_modelfile(
        self, name: str, text: str, base_dir: Path | None = None, progress: Progress | None = None
    ) -> ModelEntry:
        """Create from Modelfile text (the legacy /api/create `modelfile` field, or `ollama create -f`).
        FROM is a path when it names an existing file or directory (relative to `base_dir`)."""
        mf = parse_modelfile(text)
        return self.create(
            name,
            mf.resolve_from(base_dir),
            system=mf.system,
            template=mf.template,
            parameters=mf.parameters,
            messages=mf.messages,
            license=mf.license,
            progress=progress,
        )

    def _pin(self, draft: _Draft, digest: str) -> None:
        with self._lock:
            self._pins[digest] += 1
            draft.pinned.append(digest)

    def _add_model(self, draft: _Draft, base: str) -> None:
        """All layers of model `base`; its weights layers record it as their origin (parent_model)."""
        with self._lock:  # find and pin together, so that a concurrent delete cannot prune the base
            found = self._lookup(base)
            self._materialise(found)
            for digest in sorted(found.manifest.digests()):
                self._pin(draft, digest)
        display = found.name.display
        draft.layers = [
            Layer(x.media_type, x.digest, x.size, display, x.name) if x.media_type in (MODEL, HF_FILE) else x
            for x in found.manifest.layers
        ]
        draft.details = self._details(found)

    def _add_path(self, draft: _Draft, path: Path, say: Progress) -> None:
        """A local GGUF file or HF directory, copied into the blobs."""
        path = path.expanduser().absolute()
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(HF_SUFFIXES))
            if "config.json" not in names:
                raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
            say("parsing safetensors model")
            for rel in names:
                digest, size = self._import_file(path / rel, draft, say)
                draft.layers.append(Layer(HF_FILE, digest, size, name=rel))
        elif path.is_file():
            say("parsing GGUF")
            digest, size = self._import_file(path, draft, say)
            draft.layers.append(Layer(MODEL, digest, size))
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        self._inspect(draft)

    def _add_files(self, draft: _Draft, files: Mapping[str, str], say: Progress) -> None:
        """Uploaded blobs by file name: one GGUF, or the files of an HF directory."""
        files = {rel: f"sha256:{digest_hex(digest)}" for rel, digest in files.items()}
        for rel, digest in files.items():
            _check_relative(rel)
            self._pin(draft, digest)
            if not self.has_blob(digest):
                raise RequestError(f'blob "{digest}" not found')
        sizes = {rel: self.blob_path(d).stat().st_size for rel, d in files.items()}
        if any(rel.endswith(".safetensors") for rel in files):
            say("parsing safetensors model")
            draft.layers = [Layer(HF_FILE, files[rel], sizes[rel], name=rel) for rel in sorted(files)]
        else:
            (rel, digest), *more = files.items()
            with self.blob_path(digest).open("rb") as f:
                is_gguf = f.read(4) == b"GGUF"
            if more or not is_gguf:
                raise RequestError(
                    "files must be one GGUF file, or a Hugging Face directory (config.json and *.safetensors)"
                )
            say("parsing GGUF")
            draft.layers = [Layer(MODEL, digest, sizes[rel])]
        for layer in draft.layers:
            say(f"using existing layer {layer.digest}")
        self._inspect(draft)

    def _inspect(self, draft: _Draft) -> None:
        """Details from the checkpoint itself, which also proves that we can load it."""
        hf = [x for x in draft.layers if x.media_type == HF_FILE]
        draft.details = inspect_checkpoint(self._hf_view(hf) if hf else self._layer_file(draft.layers[0]))

    def _import_file(self, src: Path, draft: _Draft, say: Progress) -> tuple[str, int]:
        """Copy `src` into the blobs (hashing while copying) unless its bytes are already there: one
        of our blobs, or a file whose digest we know and hold (an embedded model's GGUF)."""
        size = src.stat().st_size
        real = src.resolve()  # an HF view's files are symlinks to our blobs
        own = _DIGEST.fullmatch(real.name) if real.parent == self.blobs else None
        known = f"sha256:{own.group(1)}" if own else None
        if known is None and (sha := self._facts.known_sha256(src)) is not None:
            known = f"sha256:{sha}"
        if known is not None and not self.has_blob(known) and not self._is_embedded(known):
            known = None
        if known is not None:
            self._pin(draft, known)
            say(f"using existing layer {known}")
            return known, size
        with self.blob_writer() as w, src.open("rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                w.write(chunk)
            created = w.commit(pin=True)
        draft.pinned.append(w.digest)
        if created:
            draft.created.append(w.digest)
        self._facts.remember_sha256(src, digest_hex(w.digest))
        say(f"{'creating new' if created else 'using existing'} layer {w.digest}")
        return w.digest, w.size

    def _apply(
        self,
        draft: _Draft,
        template: str | None,
        system: str | None,
        licenses: Sequence[str],
        params: dict[str, Any],
        messages: Sequence[dict[str, str]],
        say: Progress,
    ) -> None:
        """Upstream's setTemplate / setSystem / setLicense / setParameters / setMessages."""
        layers = draft.layers
        new: list[tuple[str, bytes]] = []
        if template:
            layers[:] = [x for x in layers if x.media_type not in (TEMPLATE, PROMPT)]
            new.append((TEMPLATE, template.encode()))
        if system:
            layers[:] = [x for x in layers if x.media_type != SYSTEM]
            new.append((SYSTEM, system.encode()))
        new += [(LICENSE, text.encode()) for text in licenses if text]
        if params:
            for old in [x for x in layers if x.media_type == PARAMS]:
                params = {**json.loads(self._read_blob(old.digest)), **params}
            layers[:] = [x for x in layers if x.media_type != PARAMS]
            new.append((PARAMS, json.dumps(params, ensure_ascii=False).encode()))
        if messages:
            layers[:] = [x for x in layers if x.media_type != MESSAGES]
            new.append((MESSAGES, json.dumps(messages, ensure_ascii=False).encode()))
        for media_type, data in new:
            digest, created = self._put_bytes(data, draft)
            layers.append(Layer(media_type, digest, len(data)))
            say(f"{'creating new' if created else 'using existing'} layer {digest}")

    def copy(self, source: str, destination: str) -> None:
        """A second name for a model: a new manifest with the same bytes (so the same digest)."""
        dst = parse_name(destination)
        with self._lock:
            found = self._lookup(source, f'model "{source}" not found')
            self._materialise(found)
            self._write_manifest(dst, found.manifest.to_bytes())

    def delete(self, name: str) -> None:
        """Remove a model and the blobs no other manifest references. Deleting an embedded model
        hides it (see `restore_embedded`); ModelNotFound when there is nothing to delete."""
        target = parse_name(name)
        with self._lock:
            found = self._find_manifest(target)
            embedded = self._embedded_name(target)
            hidden = self._hidden()
            if found is None and (embedded is None or embedded in hidden):
                raise ModelNotFound(name)
            if embedded is not None:
                self._set_hidden(hidden | {embedded})
            if found is not None:
                path = found[1]
                old = Manifest.parse(path.read_bytes(), path)
                path.unlink()
                here = path.parent
                while here != self.manifests and not any(here.iterdir()):
                    here.rmdir()
                    here = here.parent
                self._prune(old.digests())

    def _write_manifest(self, name: ModelName, data: bytes) -> None:
        """Write (or replace, keeping the installed casing) a manifest; prune what the old one held."""
        with self._lock:
            existing = self._find_manifest(name)
            path = existing[1] if existing else self.root / name.manifest_path
            old = Manifest.parse(path.read_bytes(), path) if existing else None
            _atomic_write(path, data)
            if old is not None:
                self._prune(old.digests())

    def _materialise(self, found: _Found) -> None:
        """Write the in-memory blobs of a virtual entry, so that a real manifest can point at them."""
        for digest in found.manifest.digests():
            if digest in self._virtual_blobs and not self.has_blob(digest):
                _atomic_write(self.blob_path(digest), self._virtual_blobs[digest])

    def _unpin(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._pins.subtract(digests)
            self._pins += Counter()  # drop the zeros

    def _prune(self, candidates: set[str]) -> None:
        """Delete the candidate blobs that no manifest references and no create holds, then the HF
        views that no manifest needs any more."""
        referenced: set[str] = set()
        views: set[str] = set()
        for _, path in self._walk():
            try:
                manifest = Manifest.parse(path.read_bytes(), path)
            except FileNotFoundError:
                continue
            except (OSError, TpOllamaError) as e:  # its layers are unknown: deleting nothing is safe
                log.warning("not pruning blobs: %s", e)
                return
            referenced |= manifest.digests()
            hf = [x for x in manifest.layers if x.media_type == HF_FILE]
            if hf:
                views.add(_view_id(hf))
        for digest in candidates - referenced - set(self._pins):
            self.blob_path(digest).unlink(missing_ok=True)
        view_root = self.own / "hf"
        for view in view_root.iterdir() if view_root.is_dir() else []:
            if view.name not in views and not view.name.startswith("."):
                shutil.rmtree(view, ignore_errors=True)


def _view_id(layers: Sequence[Layer]) -> str:
    """An HF view's directory name: a hash of its (file name, digest) listing."""
    return _sha256(json.dumps(sorted((x.name, x.digest) for x in layers)).encode())[:32]


def _config_bytes(details: ModelDetails, layers: Sequence[Layer]) -> bytes:
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


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content", "")
        if not isinstance(role, str) or role.lower() not in MESSAGE_ROLES:
            raise RequestError(f'messages[{i}]: role must be one of "system", "user", or "assistant", not {role!r}')
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}]: content must be a string")
        out.append({"role": role.lower(), "content": content})
    return out


def _check_relative(rel: str) -> None:
    """Upstream's fs.ValidPath: a relative, slash-separated path without `.`, `..` or empty parts."""
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise RequestError(f"file path must be relative: {rel!r}")
