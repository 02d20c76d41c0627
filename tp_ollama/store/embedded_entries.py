"""The embedded models (tp_ollama.store.embedded) as store entries that need no pull.

Each one's manifest lives in memory: its model layer's digest is the package file's real sha256 (hashed
once per machine, remembered by path, size and mtime in the store's file facts), and its config blob is
kept here. A layer whose blob is missing but whose digest is an embedded file's resolves to that file.
Deleting an embedded model hides it (a list of names in `hidden-embedded.json`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tp_ollama.errors import TpOllamaError
from tp_ollama.store.embedded import EMBEDDED
from tp_ollama.store.inspect import FileFacts
from tp_ollama.store.manifests import (
    CONFIG_TYPE,
    MODEL,
    Found,
    Layer,
    Manifest,
    atomic_write,
    config_bytes,
    mtime,
    sha256_hex,
)
from tp_ollama.store.names import ModelName, parse_name

log = logging.getLogger(__name__)


class EmbeddedEntries:
    """The virtual entries of one store; `own` is the store's directory for its own files."""

    def __init__(self, own: Path, facts: FileFacts) -> None:
        self._hidden_path = own / "hidden-embedded.json"
        self._facts = facts
        self._config_blobs: dict[str, bytes] = {}  # config blobs of embedded entries
        self._files: dict[str, Path] = {}  # model-layer digest -> the package's GGUF
        self._cache: dict[str, tuple[tuple[str, int, int], Found]] = {}

    @staticmethod
    def name_of(name: ModelName) -> str | None:
        """The embedded model `name` is, if any."""
        return next((e for e in EMBEDDED if parse_name(e) == name), None)

    def hidden(self) -> set[str]:
        try:
            return set(json.loads(self._hidden_path.read_text()))
        except (OSError, ValueError, TypeError):
            return set()

    def set_hidden(self, hidden: set[str]) -> None:
        atomic_write(self._hidden_path, json.dumps(sorted(hidden)).encode())

    def found(self, embedded: str) -> Found:
        """The in-memory manifest of an embedded model; CheckpointError when its package is missing."""
        path = EMBEDDED[embedded]()
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        cached = self._cache.get(embedded)
        if cached is not None and cached[0] == key:
            return cached[1]
        sha, details = self._facts.describe(path)
        model = Layer(MODEL, f"sha256:{sha}", st.st_size)
        config = config_bytes(details, [model])
        manifest = Manifest(Layer(CONFIG_TYPE, f"sha256:{sha256_hex(config)}", len(config)), (model,))
        found = Found(parse_name(embedded), manifest, sha256_hex(manifest.to_bytes()), mtime(st))
        self._config_blobs[manifest.config.digest] = config
        self._files[model.digest] = path
        self._cache[embedded] = (key, found)
        return found

    def all(self) -> list[Found]:
        """Every embedded model whose package is installed, hidden or not."""
        out = []
        for embedded in EMBEDDED:
            try:
                out.append(self.found(embedded))
            except TpOllamaError as e:
                log.warning("embedded model %s is unavailable: %s", embedded, e)
        return out

    def file(self, digest: str) -> Path | None:
        """The package file whose sha256 is `digest`, if it is an embedded model's."""
        if digest not in self._files:
            self.all()  # a fresh process learns the embedded digests here
        return self._files.get(digest)

    def config_blob(self, digest: str) -> bytes | None:
        """The config blob `digest` of an embedded entry listed or resolved so far."""
        return self._config_blobs.get(digest)
