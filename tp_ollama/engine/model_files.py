"""Where a rank reads the model it is told to load.

Node 0's ranks read the path in the `Load`. A rank of another node looks for each file of the model in
its own node's stores by digest (a node that pulled the model, or keeps a copy); what it does not find
it reads from node 0 a byte range at a time, only the ranges its shard touches, kept on this node under
`$TP_OLLAMA_CACHE/slices/` (tp_ollama.store.partial) so that a restart reads them from disk. A node
that is to keep a full copy (`models.replication.min_replicas`) fetches the rest of the file after the
load and adds it to its store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tp_ollama.engine.protocol import FileRef, Load
from tp_ollama.errors import TpOllamaError

if TYPE_CHECKING:
    from tp_ollama.checkpoints.base import FileEnsure
    from tp_ollama.store.partial import Fetch, PartialFile

log = logging.getLogger(__name__)


def read_whole(name: str) -> bool:
    """The small files of an HF model a rank reads whole: its config and a sharded model's index."""
    return name == "config.json" or name.endswith(".safetensors.index.json")


@dataclass(frozen=True)
class FilesFrom:
    """How this rank's node reaches node 0's files, and where it keeps its own."""

    node_rank: int
    connect: Callable[[], Fetch]  # opens the way to node 0's files (tp_ollama.membership.files.connect)
    stores: tuple[str, ...] = ()  # this node's store, then its extra stores
    cache: Path | None = None  # default: $TP_OLLAMA_CACHE
    keep_copy: bool = False  # add every file to this node's store after the load


@dataclass
class ModelFiles:
    """What a rank opens: `path` (a GGUF file or an HF directory), and for files held in part, the hook
    that fetches byte ranges before they are read."""

    path: Path
    identity: str | None = None
    partials: dict[Path, PartialFile] = field(default_factory=dict)  # a path as opened -> its partial file

    @property
    def source(self) -> str:
        """store (every file on this node), node 0 (bytes received now), cache (all from earlier)."""
        if not self.partials:
            return "store"
        return "node 0" if self.received else "cache"

    @property
    def received(self) -> int:
        return sum(p.received for p in self.partials.values())

    @property
    def fetch_seconds(self) -> float:
        return sum(p.fetch_seconds for p in self.partials.values())

    @property
    def cached(self) -> int:
        return sum(p.cached_bytes for p in self.partials.values())

    def ensure(self, path: Path, ranges: Sequence[tuple[int, int]]) -> None:
        partial = self.partials.get(path)
        if partial is not None:
            partial.ensure(ranges)

    def flush(self) -> None:
        """Record what arrived (tp_ollama.store.partial.PartialFile.flush)."""
        for partial in self.partials.values():
            partial.flush()

    @property
    def hook(self) -> FileEnsure | None:
        return self.ensure if self.partials else None


def identity_of(files: Sequence[FileRef]) -> str | None:
    return ",".join(f"{f.name}={f.digest}" for f in files) or None


def locate(cmd: Load, source: FilesFrom | None) -> ModelFiles:
    """The model of `cmd` as this rank reads it (see the module's doc)."""
    if source is None or not cmd.files:
        return ModelFiles(Path(cmd.path), identity_of(cmd.files))
    from tp_ollama.config.settings import default_cache_dir
    from tp_ollama.store.partial import PartialFile

    found = {f.digest: p for f in cmd.files if (p := find_local(f.digest, source.stores)) is not None}
    fetch = source.connect()
    cache = source.cache or default_cache_dir()
    single = len(cmd.files) == 1 and not cmd.files[0].name
    if single:
        ref = cmd.files[0]
        if ref.digest in found:
            return ModelFiles(found[ref.digest], identity_of(cmd.files))
        partial = PartialFile(cache, ref.digest, ref.size, fetch, what=f"model {ref.digest[:19]}")
        return ModelFiles(partial.path, identity_of(cmd.files), {partial.path: partial})
    return _hf_view(cmd.files, found, cache, fetch)


def _hf_view(files: Sequence[FileRef], found: dict[str, Path], cache: Path, fetch: Fetch) -> ModelFiles:
    """An HF directory of this node's own blobs and partial files (links under the cache)."""
    from tp_ollama.store.manifests import sha256_hex
    from tp_ollama.store.partial import PartialFile

    view = cache / "slice-views" / sha256_hex(str(identity_of(files)).encode())[:32]
    view.mkdir(parents=True, exist_ok=True)
    out = ModelFiles(view, identity_of(files))
    for ref in files:
        if not (ref.name.endswith(".safetensors") or read_whole(ref.name)):
            continue  # the tokenizer and the rest are node 0's business
        link = view / ref.name
        if ".." in Path(ref.name).parts or Path(ref.name).is_absolute():
            raise TpOllamaError(f"model file name {ref.name!r} leaves the model's directory")
        if ref.digest in found:
            target = found[ref.digest]
        else:
            partial = PartialFile(cache, ref.digest, ref.size, fetch, what=ref.name)
            if not ref.name.endswith(".safetensors"):
                partial.ensure([(0, ref.size)])
            out.partials[link] = partial
            target = partial.path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() or os.readlink(link) != str(target):
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
    return out


def find_local(digest: str, stores: Sequence[str]) -> Path | None:
    """Blob `digest` in one of these stores (or an installed embedded model with that digest)."""
    from tp_ollama.store.layout import Layout

    if not stores:
        return None
    try:
        layout = Layout(Path(stores[0]), extra_roots=[Path(s) for s in stores[1:]])
        path = layout.find_blob(digest)
        if path.is_file():
            return path
        return layout.embedded.file(digest)
    except (OSError, TpOllamaError, ValueError) as e:
        log.warning("looking for %s in this node's store failed: %s", digest, e)
        return None


def keep_copies(files: ModelFiles, cmd: Load, source: FilesFrom) -> None:
    """Make every partial file of this load a full blob of this node's store (min_replicas)."""
    if not source.stores:
        return
    blobs = Path(source.stores[0]) / "blobs"
    by_digest = {f.digest: f for f in cmd.files}
    for partial in files.partials.values():
        ref = by_digest.get(partial.file_id)
        if ref is not None:
            target = partial.promote(blobs, ref.digest)
            log.info("kept a full copy of %s in this node's store (%s)", ref.name or ref.digest, target)
