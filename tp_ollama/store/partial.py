"""A model file of which a node holds only the byte ranges its ranks read: its weight slices.

The file is a sparse file of the whole size under `$TP_OLLAMA_CACHE/slices/<digest>/` with the list of
the ranges present beside it. A reader calls `ensure(ranges)` before it touches those bytes; what is
missing is fetched (from node 0: tp_ollama.membership.files), written in place, flushed to disk and only
then listed. Ranges are kept by file, not by layout or rank, so any later layout (a restart, a group
re-formed after a failure) reads what it can from here and fetches only the rest. Ranks of one node
share the entry under a file lock.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tp_ollama.errors import TpOllamaError

log = logging.getLogger(__name__)

Range = tuple[int, int]
Fetch = Callable[[str, Sequence[Range]], bytes]  # (file id, ranges) -> their bytes back to back

MAX_BATCH_BYTES = 32 << 20
MAX_BATCH_RANGES = 2048
LOCK_TIMEOUT_S = 600.0  # another rank of this node fetching a whole model over a slow link
KEEP_ENTRIES = 4  # partial files kept; the least recently used beyond these are deleted
PROGRESS_EVERY_S = 2.0
SAVE_EVERY_S = 10.0  # the index is written at most this often while a load fetches, and at its end


class Intervals:
    """Disjoint, sorted [a, b) ranges."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for a, b in merge(ranges):
            self.starts.append(a)
            self.ends.append(b)

    def __iter__(self) -> Iterator[Range]:
        return iter(zip(self.starts, self.ends, strict=True))

    @property
    def total(self) -> int:
        return sum(b - a for a, b in self)

    def add(self, ranges: Iterable[Range]) -> None:
        """Add ranges, each inserted where it goes (a list insert each: cheap against a re-sort)."""
        starts, ends = self.starts, self.ends
        for a, b in merge(ranges):
            i = bisect.bisect_left(starts, a)
            if i > 0 and ends[i - 1] >= a:  # joins (or overlaps) the one before
                i -= 1
                a = starts[i]
                b = max(b, ends[i])
                del starts[i], ends[i]
            while i < len(starts) and starts[i] <= b:  # swallows the ones it reaches
                b = max(b, ends[i])
                del starts[i], ends[i]
            starts.insert(i, a)
            ends.insert(i, b)

    def missing(self, ranges: Iterable[Range]) -> list[Range]:
        """The parts of `ranges` not covered, merged."""
        out: list[Range] = []
        for a, b in merge(ranges):
            i = bisect.bisect_right(self.starts, a) - 1
            pos = a
            if i >= 0 and self.ends[i] > pos:
                pos = self.ends[i]
            i += 1
            while pos < b and i < len(self.starts) and self.starts[i] < b:
                if self.starts[i] > pos:
                    out.append((pos, self.starts[i]))
                pos = max(pos, self.ends[i])
                i += 1
            if pos < b:
                out.append((pos, b))
        return out


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with touching and overlapping ranges joined; empty ones dropped."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def batches(ranges: Sequence[Range]) -> Iterable[list[Range]]:
    """`ranges` cut into wants of at most MAX_BATCH_BYTES and MAX_BATCH_RANGES (big ranges split)."""
    batch: list[Range] = []
    size = 0
    for a, b in ranges:
        while a < b:
            take = min(b - a, MAX_BATCH_BYTES - size)
            batch.append((a, a + take))
            size += take
            a += take
            if size >= MAX_BATCH_BYTES or len(batch) >= MAX_BATCH_RANGES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def slices_root(cache: Path) -> Path:
    return cache / "slices"


class PartialFile:
    """File `file_id` (`size` bytes), held in part under `root`; `fetch` gets what is missing."""

    def __init__(self, root: Path, file_id: str, size: int, fetch: Fetch, what: str = "") -> None:
        self.file_id, self.size, self.fetch = file_id, size, fetch
        self.what = what or file_id
        self.dir = slices_root(root) / file_id.replace(":", "-")
        self.path = self.dir / "data"
        self._index = self.dir / "ranges.json"
        self.received = 0  # bytes fetched by this process
        self.fetch_seconds = 0.0  # spent fetching them (waiting for node 0 and writing them here)
        self._unsaved = False  # ranges written here and not listed in the index yet
        self._saved_at = time.monotonic()
        self._index_seen = 0  # mtime_ns of the index when this process last read it
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if not self.path.exists() or self.path.stat().st_size != size:
                self._reset()
            self.present = self._read_index()
        os.utime(self.dir)  # recently used
        prune(slices_root(root), keep=self.dir)

    def ensure(self, ranges: Iterable[Range]) -> None:
        """Have the bytes of `ranges` here (fetching what is missing), before they are read."""
        wanted = [(max(0, a), min(self.size, b)) for a, b in ranges]
        if not self.present.missing(wanted):
            return
        with self._locked():
            self._catch_up()  # another rank of this node may have fetched them
            missing = self.present.missing(wanted)
            if missing:
                self._fetch(missing)
            if self._unsaved and time.monotonic() - self._saved_at > SAVE_EVERY_S:
                self._save()

    def flush(self) -> None:
        """List what arrived in the index (after flushing the bytes to disk): a restart finds it."""
        if self._unsaved:
            with self._locked():
                self._catch_up()
                self._save()

    def _catch_up(self) -> None:
        """Add what other processes listed since this one last read the index."""
        try:
            seen = self._index.stat().st_mtime_ns
        except OSError:
            return
        if seen != self._index_seen:
            self.present.add(self._read_index())

    def _fetch(self, missing: list[Range]) -> None:
        total = sum(b - a for a, b in missing)
        done, t0, said = 0, time.monotonic(), time.monotonic()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for batch in batches(missing):
                data = self.fetch(self.file_id, batch)
                at = 0
                for a, b in batch:
                    os.pwrite(fd, memoryview(data)[at : at + b - a], a)
                    at += b - a
                done += at
                if time.monotonic() - said > PROGRESS_EVERY_S:
                    said = time.monotonic()
                    log.info("receiving %s: %.1f of %.1f MB", self.what, done / 1e6, total / 1e6)
        finally:
            os.close(fd)
        self.received += total
        self.fetch_seconds += time.monotonic() - t0
        self.present.add(missing)
        self._unsaved = True
        if total >= 1 << 20:
            elapsed = time.monotonic() - t0
            log.info("received %.1f MB of %s in %.2f s", total / 1e6, self.what, elapsed)

    @property
    def complete(self) -> bool:
        return not self.present.missing([(0, self.size)])

    @property
    def cached_bytes(self) -> int:
        """Bytes of this file on this node's disk (the sparse file's allocated blocks)."""
        try:
            return self.path.stat().st_blocks * 512
        except OSError:
            return 0

    def promote(self, blobs: Path, digest: str) -> Path:
        """Make the whole file (fetched first) blob `digest` of a store: its sha256 checked, then moved
        into `blobs`. The partial entry is gone afterwards."""
        self.ensure([(0, self.size)])
        h = hashlib.sha256()
        with self.path.open("rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        if f"sha256:{h.hexdigest()}" != digest:
            self._reset()
            raise TpOllamaError(f"the copy of {self.what} received from node 0 does not match digest {digest}")
        target = blobs / digest.replace(":", "-")
        blobs.mkdir(parents=True, exist_ok=True)
        tmp = blobs / f".{target.name}.{os.getpid()}.partial"
        try:
            os.rename(self.path, tmp)
        except OSError:  # another filesystem
            shutil.copyfile(self.path, tmp)
        os.replace(tmp, target)
        shutil.rmtree(self.dir, ignore_errors=True)
        return target

    # --- the entry on disk -------------------------------------------------------------------------

    def _reset(self) -> None:
        with self.path.open("wb") as f:
            f.truncate(self.size)  # sparse: blocks are allocated as ranges arrive
        self._index.unlink(missing_ok=True)
        self.present = Intervals()
        self._unsaved = False

    def _save(self) -> None:
        """fsync the data, then list its ranges: an index never names bytes that are not on disk."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._write_index()
        self._unsaved, self._saved_at = False, time.monotonic()

    def _read_index(self) -> Intervals:
        try:
            self._index_seen = self._index.stat().st_mtime_ns
            data = json.loads(self._index.read_text())
        except (OSError, ValueError):
            return Intervals()
        if not isinstance(data, dict) or data.get("size") != self.size:
            return Intervals()
        return Intervals((int(a), int(b)) for a, b in data.get("ranges", []))

    def _write_index(self) -> None:
        tmp = self._index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"id": self.file_id, "size": self.size, "ranges": [list(r) for r in self.present]}))
        os.replace(tmp, self._index)
        self._index_seen = self._index.stat().st_mtime_ns

    def _locked(self) -> _Lock:
        return _Lock(self.dir / "lock", self.what)


class _Lock:
    """An exclusive flock on a file, waited for at most LOCK_TIMEOUT_S."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TpOllamaError(
                        f"{self.what}: another process held {self.path} for {LOCK_TIMEOUT_S:g} s"
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def prune(root: Path, keep: Path) -> None:
    """Delete the least recently used entries beyond KEEP_ENTRIES (never `keep`)."""
    try:
        entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[KEEP_ENTRIES:]:
        if old != keep:
            log.info("removing the cached slices %s (least recently used)", old)
            shutil.rmtree(old, ignore_errors=True)
