"""A file held in part: ranges fetched on demand through a test double of node 0 (reads a local file
and counts what it was asked), kept in a sparse file, listed for the next process once flushed,
shared by two processes' views of one entry, and made a checked blob of a store."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from tp_ollama.errors import TpOllamaError
from tp_ollama.store.partial import KEEP_ENTRIES, Intervals, PartialFile, batches, merge


class LocalNode0:
    """Test double of node 0's file service: answers wants from a local file, and records them."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.asked: list[tuple[int, int]] = []

    def fetch(self, file_id: str, ranges: Sequence[tuple[int, int]]) -> bytes:
        self.asked += ranges
        return b"".join(self.data[a:b] for a, b in ranges)

    @property
    def sent(self) -> int:
        return sum(b - a for a, b in self.asked)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, every byte telling where it is
    return path


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_intervals_say_what_is_missing():
    have = Intervals([(10, 20), (30, 40), (20, 25)])
    assert list(have) == [(10, 25), (30, 40)]
    assert have.missing([(0, 50)]) == [(0, 10), (25, 30), (40, 50)]
    assert have.missing([(12, 24), (31, 39)]) == []
    assert have.missing([(24, 31)]) == [(25, 30)]
    have.add([(25, 30)])
    assert list(have) == [(10, 40)] and have.total == 30
    have.add([(0, 5), (41, 45), (44, 50), (5, 10)])
    assert list(have) == [(0, 40), (41, 50)]
    assert merge([(5, 6), (0, 2), (2, 3), (7, 7)]) == [(0, 3), (5, 6)]


def test_big_ranges_are_cut_into_wants_of_bounded_size():
    out = list(batches([(0, 70 << 20), (80 << 20, (80 << 20) + 10)]))
    assert [sum(b - a for a, b in batch) for batch in out] == [32 << 20, 32 << 20, (6 << 20) + 10]
    assert out[0] == [(0, 32 << 20)]
    many = list(batches([(i * 10, i * 10 + 1) for i in range(5000)]))
    assert [len(b) for b in many] == [2048, 2048, 904]


def test_only_missing_bytes_are_fetched_and_a_flushed_entry_serves_the_next_process(source, tmp_path):
    node0 = LocalNode0(source)
    size = source.stat().st_size
    part = PartialFile(tmp_path / "cache", "sha256:ab", size, node0.fetch)
    part.ensure([(100, 200), (1000, 5000)])
    part.ensure([(150, 180), (4000, 6000)])
    assert node0.asked == [(100, 200), (1000, 5000), (5000, 6000)]
    data = part.path.read_bytes()
    assert data[100:200] == source.read_bytes()[100:200] and data[1000:6000] == source.read_bytes()[1000:6000]
    assert part.cached_bytes < size // 4  # sparse: the rest takes no disk
    # Not flushed: a new process does not trust what it cannot see listed.
    again = LocalNode0(source)
    PartialFile(tmp_path / "cache", "sha256:ab", size, again.fetch).ensure([(100, 200)])
    assert again.sent == 100
    part.flush()
    later = LocalNode0(source)
    restarted = PartialFile(tmp_path / "cache", "sha256:ab", size, later.fetch)
    restarted.ensure([(100, 200), (1000, 6000)])
    assert later.asked == []
    assert not restarted.complete
    restarted.ensure([(0, size)])
    assert restarted.complete and restarted.path.read_bytes() == source.read_bytes()


def test_two_processes_of_a_node_share_one_entry(source, tmp_path):
    node0 = LocalNode0(source)
    size = source.stat().st_size
    a = PartialFile(tmp_path, "sha256:cd", size, node0.fetch)
    b = PartialFile(tmp_path, "sha256:cd", size, node0.fetch)
    a.ensure([(0, 4096)])
    a.flush()
    b.ensure([(0, 4096), (8192, 9000)])  # b sees a's listing and asks only for the rest
    assert node0.asked == [(0, 4096), (8192, 9000)]


def test_a_full_copy_becomes_a_blob_only_when_its_digest_matches(source, tmp_path):
    digest = digest_of(source)
    blobs = tmp_path / "store" / "blobs"
    good = PartialFile(tmp_path / "cache", digest, source.stat().st_size, LocalNode0(source).fetch)
    blob = good.promote(blobs, digest)
    assert blob == blobs / f"sha256-{digest.removeprefix('sha256:')}"
    assert blob.read_bytes() == source.read_bytes() and not good.dir.exists()
    lying = LocalNode0(source)
    lying.data = lying.data[:-1] + b"x"
    bad = PartialFile(tmp_path / "cache", "sha256:" + "1" * 64, source.stat().st_size, lying.fetch, what="m")
    with pytest.raises(TpOllamaError, match="the copy of m received from node 0 does not match digest sha256:1111"):
        bad.promote(blobs, "sha256:" + "1" * 64)
    assert sorted(p.name for p in blobs.iterdir()) == [blob.name]


def test_the_least_recently_used_entries_are_pruned(source, tmp_path):
    node0 = LocalNode0(source)
    for i in range(KEEP_ENTRIES + 2):
        PartialFile(tmp_path, f"sha256:{i:02x}", 1000, node0.fetch)
    assert len(list((tmp_path / "slices").iterdir())) == KEEP_ENTRIES
