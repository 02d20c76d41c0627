"""Creating a model, as /api/create and `ollama create` do: its weights from uploaded blobs, a local GGUF
file or HF directory, or another model's layers; then the Modelfile's layers over them and a config blob.
A model created FROM another (an embedded one included) costs a manifest and small blobs, never the
weights again."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tp_ollama.errors import CheckpointError, RequestError
from tp_ollama.store.inspect import inspect_checkpoint
from tp_ollama.store.layout import Layout
from tp_ollama.store.manifests import (
    CONFIG_TYPE,
    COPY_CHUNK,
    DIGEST,
    HF_FILE,
    HF_SUFFIXES,
    LICENSE,
    MESSAGES,
    MODEL,
    PARAMS,
    PROMPT,
    SYSTEM,
    TEMPLATE,
    Layer,
    Manifest,
    ModelDetails,
    config_bytes,
    digest_hex,
)
from tp_ollama.store.modelfile import MESSAGE_ROLES

Progress = Callable[[str], None]


class Draft:
    """The layers of a model being created, and its details. Every blob it uses is pinned in `layout`
    (listed in `pinned`, for the creator to unpin when done), and the blobs it wrote are listed in
    `created`, to prune if the create fails."""

    def __init__(self, layout: Layout, say: Progress) -> None:
        self.layout = layout
        self.say = say
        self.layers: list[Layer] = []
        self.details = ModelDetails()
        self.pinned: list[str] = []  # digests held against pruning meanwhile
        self.created: list[str] = []  # blobs this create wrote, pruned if it fails

    def add_weights(self, from_: str | Path | None, files: Mapping[str, str] | None) -> None:
        """The weights from `files`, or `from_`: a Path, `@sha256:<hex>` (an uploaded GGUF blob) or a
        model name (see ModelStore.create)."""
        if files:
            self._add_files(files)
        elif isinstance(from_, Path):
            self._add_path(from_)
        elif isinstance(from_, str) and from_.startswith("@"):
            self._add_files({"model.gguf": from_[1:]})
        else:
            self._add_model(str(from_))

    def apply(
        self,
        template: str | None,
        system: str | None,
        licenses: Sequence[str],
        params: dict[str, Any],
        messages: Sequence[dict[str, str]],
    ) -> None:
        """Upstream's setTemplate / setSystem / setLicense / setParameters / setMessages."""
        layers = self.layers
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
                params = {**json.loads(self.layout.read_blob(old.digest)), **params}
            layers[:] = [x for x in layers if x.media_type != PARAMS]
            new.append((PARAMS, json.dumps(params, ensure_ascii=False).encode()))
        if messages:
            layers[:] = [x for x in layers if x.media_type != MESSAGES]
            new.append((MESSAGES, json.dumps(messages, ensure_ascii=False).encode()))
        for media_type, data in new:
            digest, created = self._put_bytes(data)
            layers.append(Layer(media_type, digest, len(data)))
            self.say(f"{'creating new' if created else 'using existing'} layer {digest}")

    def manifest(self) -> Manifest:
        """The manifest of the layers so far, with their config blob written."""
        config = config_bytes(self.details, self.layers)
        config_digest, _ = self._put_bytes(config)
        return Manifest(Layer(CONFIG_TYPE, config_digest, len(config)), tuple(self.layers))

    def _pin(self, digest: str) -> None:
        self.layout.pin(digest)
        self.pinned.append(digest)

    def _put_bytes(self, data: bytes) -> tuple[str, bool]:
        with self.layout.blob_writer() as w:
            w.write(data)
            created = w.commit(pin=True)
        self.pinned.append(w.digest)
        if created:
            self.created.append(w.digest)
        return w.digest, created

    def _add_model(self, base: str) -> None:
        """All layers of model `base`; its weights layers record it as their origin (parent_model)."""
        layout = self.layout
        with layout.lock:  # find and pin together, so that a concurrent delete cannot prune the base
            found = layout.lookup(base)
            layout.materialise(found)
            for digest in sorted(found.manifest.digests()):
                self._pin(digest)
        display = found.name.display
        self.layers = [
            Layer(x.media_type, x.digest, x.size, display, x.name) if x.media_type in (MODEL, HF_FILE) else x
            for x in found.manifest.layers
        ]
        self.details = layout.details(found)

    def _add_path(self, path: Path) -> None:
        """A local GGUF file or HF directory, copied into the blobs."""
        path = path.expanduser().absolute()
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(HF_SUFFIXES))
            if "config.json" not in names:
                raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
            self.say("parsing safetensors model")
            for rel in names:
                digest, size = self._import_file(path / rel)
                self.layers.append(Layer(HF_FILE, digest, size, name=rel))
        elif path.is_file():
            self.say("parsing GGUF")
            digest, size = self._import_file(path)
            self.layers.append(Layer(MODEL, digest, size))
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        self._inspect()

    def _add_files(self, files: Mapping[str, str]) -> None:
        """Uploaded blobs by file name: one GGUF, or the files of an HF directory."""
        layout = self.layout
        files = {rel: f"sha256:{digest_hex(digest)}" for rel, digest in files.items()}
        for rel, digest in files.items():
            check_relative(rel)
            self._pin(digest)
            if not layout.has_blob(digest):
                raise RequestError(f'blob "{digest}" not found')
        sizes = {rel: layout.blob_path(d).stat().st_size for rel, d in files.items()}
        if any(rel.endswith(".safetensors") for rel in files):
            self.say("parsing safetensors model")
            self.layers = [Layer(HF_FILE, files[rel], sizes[rel], name=rel) for rel in sorted(files)]
        else:
            (rel, digest), *more = files.items()
            with layout.blob_path(digest).open("rb") as f:
                is_gguf = f.read(4) == b"GGUF"
            if more or not is_gguf:
                raise RequestError(
                    "files must be one GGUF file, or a Hugging Face directory (config.json and *.safetensors)"
                )
            self.say("parsing GGUF")
            self.layers = [Layer(MODEL, digest, sizes[rel])]
        for layer in self.layers:
            self.say(f"using existing layer {layer.digest}")
        self._inspect()

    def _inspect(self) -> None:
        """Details from the checkpoint itself, which also proves that we can load it."""
        hf = [x for x in self.layers if x.media_type == HF_FILE]
        self.details = inspect_checkpoint(self.layout.hf_view(hf) if hf else self.layout.layer_file(self.layers[0]))

    def _import_file(self, src: Path) -> tuple[str, int]:
        """Copy `src` into the blobs (hashing while copying) unless its bytes are already there: one
        of our blobs, or a file whose digest we know and hold (an embedded model's GGUF)."""
        layout = self.layout
        size = src.stat().st_size
        real = src.resolve()  # an HF view's files are symlinks to our blobs
        own = DIGEST.fullmatch(real.name) if real.parent == layout.blobs else None
        known = f"sha256:{own.group(1)}" if own else None
        if known is None and (sha := layout.facts.known_sha256(src)) is not None:
            known = f"sha256:{sha}"
        if known is not None and not layout.has_blob(known) and layout.embedded.file(known) is None:
            known = None
        if known is not None:
            self._pin(known)
            self.say(f"using existing layer {known}")
            return known, size
        with layout.blob_writer() as w, src.open("rb") as f:
            while chunk := f.read(COPY_CHUNK):
                w.write(chunk)
            created = w.commit(pin=True)
        self.pinned.append(w.digest)
        if created:
            self.created.append(w.digest)
        layout.facts.remember_sha256(src, digest_hex(w.digest))
        self.say(f"{'creating new' if created else 'using existing'} layer {w.digest}")
        return w.digest, w.size


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
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


def check_relative(rel: str) -> None:
    """Upstream's fs.ValidPath: a relative, slash-separated path without `.`, `..` or empty parts."""
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise RequestError(f"file path must be relative: {rel!r}")
