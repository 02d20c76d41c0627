"""The store's files under its root: blobs, manifests and the HF views, found, read, written and pruned.

Thread-safe for one server process: changes hold `lock` for their short critical sections only, and
digests a create is still assembling are pinned so that a concurrent delete cannot prune them. Reads
need no lock: every file is replaced atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tp_ollama.errors import CheckpointError, ModelNotFound, RequestError, TpOllamaError
from tp_ollama.store.embedded_entries import EmbeddedEntries
from tp_ollama.store.inspect import FileFacts
from tp_ollama.store.manifests import (
    HF_FILE,
    BlobWriter,
    Found,
    Layer,
    Manifest,
    ModelDetails,
    atomic_write,
    config_details,
    digest_hex,
    mtime,
    sha256_hex,
)
from tp_ollama.store.names import ModelName, parse_name

log = logging.getLogger(__name__)


class Layout:
    """Ollama's layout under `root` (made absolute here), plus `tp-ollama/` for our own files: the HF
    views, the file facts (`facts_path`, by default `tp-ollama/files.json`) and the hidden embedded
    models."""

    def __init__(self, root: Path, facts_path: Path | None = None, extra_roots: Sequence[Path] = ()) -> None:
        self.root = Path(root).expanduser().absolute()
        # Other stores in Ollama's layout (another installation's), read in place and never written:
        # their models are listed and loaded from their own blobs; deleting one is refused.
        extra = [Path(r).expanduser().absolute() for r in extra_roots]
        self.extra = [r for r in dict.fromkeys(extra) if r != self.root]
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.own = self.root / "tp-ollama"
        self.facts = FileFacts(facts_path or self.own / "files.json")
        self.embedded = EmbeddedEntries(self.own, self.facts)
        self.lock = threading.RLock()
        self._pins: Counter[str] = Counter()

    # --- blobs -----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{digest_hex(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_writer(self, digest: str | None = None) -> BlobWriter:
        """A writer for a blob whose digest is `digest` (checked on commit), or any content if None."""
        return BlobWriter(self.blobs, digest_hex(digest) if digest is not None else None, self._place)

    def _place(self, partial: Path, digest: str, pin: bool) -> bool:
        with self.lock:
            target = self.blob_path(digest)
            created = not target.exists()
            if created:
                os.replace(partial, target)
            else:
                partial.unlink(missing_ok=True)
            if pin:
                self._pins[digest] += 1
        return created

    def find_blob(self, digest: str) -> Path:
        """Where blob `digest` can be read: this store's, else the first extra store's that has it
        (this store's path when none has it)."""
        path = self.blob_path(digest)
        if path.is_file() or not self.extra:
            return path
        name = path.name
        for root in self.extra:
            there = root / "blobs" / name
            if there.is_file():
                return there
        return path

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.find_blob(digest).read_bytes()
        except FileNotFoundError:
            config = self.embedded.config_blob(digest)
            if config is not None:
                return config
            raise CheckpointError(f"blob {digest} is missing from {self.blobs}") from None

    def layer_file(self, layer: Layer) -> Path:
        """A layer's bytes on disk: its blob, or the embedded package file with that digest."""
        path = self.find_blob(layer.digest)
        if path.is_file():
            return path
        embedded = self.embedded.file(layer.digest)
        if embedded is not None:
            return embedded
        raise CheckpointError(f"blob {layer.digest} is missing from {self.blobs}")

    def pin(self, digest: str) -> None:
        """Keep blob `digest` from pruning until `unpin`."""
        with self.lock:
            self._pins[digest] += 1

    def unpin(self, digests: Iterable[str]) -> None:
        with self.lock:
            self._pins.subtract(digests)
            self._pins += Counter()  # drop the zeros

    # --- manifests -------------------------------------------------------------------------------

    def walk(self, writable_only: bool = False) -> Iterator[tuple[ModelName, Path]]:
        """Every manifest file as (name with its installed casing, path), this store's first, then the
        extra stores' (a name already seen is skipped); invalid names skipped."""
        seen: set[ModelName] = set()
        for manifests in [self.manifests, *([] if writable_only else [r / "manifests" for r in self.extra])]:
            for name, path in _walk(manifests):
                if name not in seen:
                    seen.add(name)
                    yield name, path

    def is_extra(self, path: Path) -> Path | None:
        """The extra store `path` (a manifest) belongs to, or None when it is this store's."""
        if path.is_relative_to(self.root):
            return None
        return next((root for root in self.extra if path.is_relative_to(root)), None)

    def find_manifest(self, name: ModelName, writable_only: bool = False) -> tuple[ModelName, Path] | None:
        """The installed manifest for `name`, matching each part case-insensitively: this store's, else
        (unless `writable_only`) the first extra store's."""
        for root in [self.root, *([] if writable_only else self.extra)]:
            found = _find_manifest(root, name)
            if found is not None:
                return found
        return None

    def read_found(self, name: ModelName, path: Path) -> Found:
        data = path.read_bytes()
        return Found(name, Manifest.parse(data, path), sha256_hex(data), mtime(path.stat()))

    def lookup(self, text: str, message: str | None = None) -> Found:
        """The model `text` names: installed, or a visible embedded one; ModelNotFound otherwise."""
        name = parse_name(text)
        found = self.find_manifest(name)
        if found is not None:
            try:
                return self.read_found(*found)
            except FileNotFoundError:
                pass  # deleted meanwhile
        embedded = self.embedded.name_of(name)
        if embedded is not None and embedded not in self.embedded.hidden():
            return self.embedded.found(embedded)
        raise ModelNotFound(text, message)

    def details(self, found: Found) -> ModelDetails:
        return config_details(self.read_blob(found.manifest.config.digest), found.manifest.layers)

    def write_manifest(self, name: ModelName, data: bytes) -> None:
        """Write (or replace, keeping the installed casing) a manifest; prune what the old one held."""
        with self.lock:
            existing = self.find_manifest(name, writable_only=True)
            path = existing[1] if existing else self.root / name.manifest_path
            old = Manifest.parse(path.read_bytes(), path) if existing else None
            atomic_write(path, data)
            if old is not None:
                self.prune(old.digests())

    def remove_manifest(self, path: Path) -> None:
        """Delete a manifest file, the directories it leaves empty, and the blobs only it held."""
        extra = self.is_extra(path)
        if extra is not None:
            raise RequestError(
                f"{path.relative_to(extra / 'manifests')} is in the read-only store {extra}: delete it there"
            )
        with self.lock:
            old = Manifest.parse(path.read_bytes(), path)
            path.unlink()
            here = path.parent
            while here != self.manifests and not any(here.iterdir()):
                here.rmdir()
                here = here.parent
            self.prune(old.digests())

    def materialise(self, found: Found) -> None:
        """Write the in-memory blobs of a virtual entry, so that a real manifest can point at them."""
        for digest in found.manifest.digests():
            config = self.embedded.config_blob(digest)
            if config is not None and not self.has_blob(digest):
                atomic_write(self.blob_path(digest), config)

    def prune(self, candidates: set[str]) -> None:
        """Delete the candidate blobs that no manifest references and no create holds, then the HF
        views that no manifest needs any more."""
        referenced: set[str] = set()
        views: set[str] = set()
        for _, path in self.walk():
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

    # --- HF views --------------------------------------------------------------------------------

    def hf_view(self, layers: Sequence[Layer]) -> Path:
        """A directory of relative symlinks to the blobs of an HF model, built once and reused."""
        listing = sorted((layer.name, layer.digest) for layer in layers)
        view = self.own / "hf" / _view_id(layers)
        if view.is_dir():
            return view
        view.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=view.parent, prefix=".tmp-"))
        try:
            for rel, digest in listing:
                blob = self.layer_file(Layer(HF_FILE, digest, 0))
                link = tmp / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, (view / rel).parent))
            os.rename(tmp, view)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not view.is_dir():  # not just a concurrent builder that won the rename
                raise
        return view


def _view_id(layers: Sequence[Layer]) -> str:
    """An HF view's directory name: a hash of its (file name, digest) listing."""
    return sha256_hex(json.dumps(sorted((x.name, x.digest) for x in layers)).encode())[:32]


def _walk(manifests: Path) -> Iterator[tuple[ModelName, Path]]:
    for host in _children(manifests):
        for ns in _children(host):
            for model in _children(ns):
                for tag in _children(model):
                    try:
                        name = parse_name(f"{host.name}/{ns.name}/{model.name}:{tag.name}")
                    except TpOllamaError:
                        continue
                    if tag.is_file():
                        yield name, tag


def _find_manifest(root: Path, name: ModelName) -> tuple[ModelName, Path] | None:
    exact = root / name.manifest_path
    if exact.is_file():
        return name, exact
    here, parts = root / "manifests", []
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


def _children(directory: Path) -> list[Path]:
    """Sorted entries of a directory; none when it is not one (or vanished meanwhile)."""
    try:
        return sorted(directory.iterdir())
    except (NotADirectoryError, FileNotFoundError):
        return []
