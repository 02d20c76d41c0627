"""Model files from node 0 to a rank that lacks them: node 0's real coordinator on a loopback port (in
a thread with its own event loop), a rank's FileSource and PartialFile in this thread, and the
embedded SmolLM2 GGUF loaded from the ranges fetched."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tp_ollama.checkpoints.loader import open_checkpoint
from tp_ollama.launch import free_port
from tp_ollama.membership import wire
from tp_ollama.membership.coordinator import Coordinator
from tp_ollama.membership.files import FileError, FileSource, compression_pays
from tp_ollama.store.embedded import resolve_model
from tp_ollama.store.partial import PartialFile

SECRET = "files-secret"


@pytest.fixture(scope="module")
def gguf() -> Path:
    return resolve_model("smollm2:135m")


@pytest.fixture(scope="module")
def digest(gguf: Path) -> str:
    return "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()


@pytest.fixture
def node0(gguf: Path, digest: str) -> Iterator[tuple[Coordinator, int]]:
    """A started coordinator offering the GGUF file under its digest."""
    port = free_port()
    template = wire.Form(generation=0, nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=0)
    c = Coordinator(
        nnodes=2, nproc=1, master_addr="127.0.0.1", port=port, secret=SECRET, detect_timeout_s=2.0, min_nodes=1,
        retry_timeout_s=5.0, join_timeout_s=10.0, tp_weights=None, form_template=template,
    )  # fmt: skip
    c.files.offer(digest, gguf)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(c.start(), loop).result(10)
    try:
        yield c, port
    finally:
        asyncio.run_coroutine_threadsafe(c.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_compression_is_used_only_where_it_saves_time():
    zeros = bytes(4 << 20)
    random = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8).numpy().tobytes()
    assert compression_pays(zeros, 10e6)  # 10 MB/s: zeros compress to nothing, fast
    assert not compression_pays(random, 10e6)  # nothing to gain
    assert not compression_pays(zeros, 0.0)  # a link not measured yet is taken as fast


def test_a_rank_loads_its_slices_from_node_0_and_later_from_its_cache(node0, gguf, digest, tmp_path):
    c, port = node0
    source = FileSource("127.0.0.1", port, 1, SECRET)
    partial = PartialFile(tmp_path, digest, gguf.stat().st_size, source.fetch, what="smollm2")
    ckpt = open_checkpoint(partial.path, lambda path, ranges: partial.ensure(ranges), identity=digest)
    whole = open_checkpoint(gguf)
    names = sorted(n for n in whole.names() if n.endswith("proj.weight"))
    # Rank 1 of 2: the second half of rows of column-parallel weights, of columns of row-parallel ones.
    for name in names:
        rows, cols = whole.shape(name)
        if "o_proj" in name or "down_proj" in name:
            got, want = ckpt.read_int8(name, cols=(cols // 2, cols)), whole.read_int8(name, cols=(cols // 2, cols))
        else:
            half = rows // 2 // 64 * 64  # whole heads
            got, want = (
                ckpt.read(name, torch.float32, rows=(half, rows)),
                whole.read(name, torch.float32, rows=(half, rows)),
            )
        if want is None or got is None:
            continue
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), name
        else:
            assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale), name
    size = gguf.stat().st_size
    assert 0.2 * size < partial.received < 0.6 * size  # the rank's share of those weights, and the header
    assert partial.cached_bytes < 0.65 * size  # a sparse file: only what arrived takes disk
    assert source.received == partial.received  # nothing compressed on a fast link
    sent = {(r["node"], r["file"]): r["bytes_sent"] for r in c.files.report()}
    assert sent[(1, digest)] == partial.received
    source.close()
    partial.flush()  # the end of a load: what arrived is listed

    # A restart: the same ranges come from this node's disk, nothing is asked of node 0.
    again = FileSource("127.0.0.1", port, 1, SECRET)
    restarted = PartialFile(tmp_path, digest, size, again.fetch, what="smollm2")
    ckpt = open_checkpoint(restarted.path, lambda path, ranges: restarted.ensure(ranges), identity=digest)
    name = next(n for n in names if "gate_proj" in n)  # read by rows above
    rows = whole.shape(name)[0]
    assert torch.equal(
        ckpt.read(name, torch.float32, rows=(rows // 2, rows)), whole.read(name, torch.float32, rows=(rows // 2, rows))
    )
    assert restarted.received == 0 and again.received == 0
    # A range never read before is fetched then.
    assert torch.equal(ckpt.read(name, torch.float32, rows=(0, 64)), whole.read(name, torch.float32, rows=(0, 64)))
    assert restarted.received > 0
    again.close()


def test_a_full_copy_is_checked_against_its_digest(node0, gguf, digest, tmp_path):
    _, port = node0
    source = FileSource("127.0.0.1", port, 1, SECRET)
    partial = PartialFile(tmp_path / "cache", digest, gguf.stat().st_size, source.fetch)
    blob = partial.promote(tmp_path / "store" / "blobs", digest)
    assert blob.name == "sha256-" + digest.removeprefix("sha256:")
    assert blob.read_bytes() == gguf.read_bytes()
    assert not partial.dir.exists()
    source.close()


def test_node_0_refuses_what_it_does_not_offer_and_a_wrong_secret(node0, digest):
    _, port = node0
    source = FileSource("127.0.0.1", port, 1, SECRET)
    with pytest.raises(FileError, match="offers no file sha256:0000"):
        source.fetch("sha256:" + "0" * 64, [(0, 10)])
    with pytest.raises(FileError, match=r"range 0:999999999999 of sha256:\w+ is outside"):
        source.fetch(digest, [(0, 999_999_999_999)])
    assert source.fetch(digest, [(0, 4), (8, 12)])[:4] == b"GGUF"  # the connection is still good
    intruder = FileSource("127.0.0.1", port, 1, "not-the-secret")
    with pytest.raises(FileError, match="refused this rank: the cluster secret does not match"):
        intruder.fetch(digest, [(0, 4)])
    source.close()


def test_a_lost_node_0_fails_the_fetch_with_its_address(tmp_path):
    port = free_port()
    source = FileSource("127.0.0.1", port, 1, SECRET, timeout_s=1.0)
    source.ATTEMPTS = 2
    with pytest.raises(FileError, match=rf"fetching sha256:ab from node 0 at 127.0.0.1:{port} failed 2 times"):
        source.fetch("sha256:ab", [(0, 4)])
