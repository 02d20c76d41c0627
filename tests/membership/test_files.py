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
from tp_ollama.store.partial import Intervals, PartialFile, batches, merge

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


def test_intervals_say_what_is_missing():
    have = Intervals([(10, 20), (30, 40), (20, 25)])
    assert list(have) == [(10, 25), (30, 40)]
    assert have.missing([(0, 50)]) == [(0, 10), (25, 30), (40, 50)]
    assert have.missing([(12, 24), (31, 39)]) == []
    assert have.missing([(24, 31)]) == [(25, 30)]
    have.add([(25, 30)])
    assert list(have) == [(10, 40)] and have.total == 30
    assert merge([(5, 6), (0, 2), (2, 3), (7, 7)]) == [(0, 3), (5, 6)]


def test_big_ranges_are_cut_into_wants_of_bounded_size():
    out = list(batches([(0, 70 << 20), (80 << 20, (80 << 20) + 10)]))
    assert [sum(b - a for a, b in batch) for batch in out] == [32 << 20, 32 << 20, (6 << 20) + 10]
    assert out[0] == [(0, 32 << 20)]
    many = list(batches([(i * 10, i * 10 + 1) for i in range(5000)]))
    assert [len(b) for b in many] == [2048, 2048, 904]


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


def test_a_node_that_keeps_copies_adds_the_file_to_its_store(node0, gguf, digest, tmp_path, monkeypatch):
    """A rank of node 1 whose node keeps full copies (models.replication.min_replicas): it loads from
    what it receives, then the whole file, checked, becomes a blob of its store; the next load reads it."""
    from tp_ollama.engine.model_files import FilesFrom
    from tp_ollama.engine.protocol import FileRef, Load
    from tp_ollama.engine.state import EngineJob, EngineState
    from tp_ollama.parallel.comm import SoloComm

    c, port = node0
    # The embedded file would be found on this node (its package is installed): a copy no store has.
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf.read_bytes() + b"\0" * 64)
    digest = "sha256:" + hashlib.sha256(other.read_bytes()).hexdigest()
    c.files.offer(digest, other)
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    store = tmp_path / "store"
    source = FilesFrom("127.0.0.1", port, 1, (str(store),), cache=tmp_path / "cache", keep_copy=True)
    state = EngineState(EngineJob(kv_cache_bytes=1 << 22, files_from=source), SoloComm())
    size = other.stat().st_size
    cmd = Load("l1", "/nowhere/on/this/node.gguf", num_ctx=256, files=[FileRef("", digest, size)])
    weights = state.load(cmd).layout[0]
    assert weights["node"] == 1 and weights["weights_from"] == "node 0" and weights["received_bytes"] == size
    blob = store / "blobs" / f"sha256-{digest.removeprefix('sha256:')}"
    assert blob.read_bytes() == other.read_bytes()
    state.unload()
    again = EngineState(EngineJob(kv_cache_bytes=1 << 22, files_from=source), SoloComm())
    weights = again.load(Load("l2", cmd.path, num_ctx=256, files=cmd.files)).layout[0]
    assert weights["weights_from"] == "store" and weights["received_bytes"] == 0


def test_a_rank_reads_its_slices_of_a_safetensors_model(node0, tmp_path, monkeypatch):
    """An HF directory (config and safetensors weights, a tiny random Llama): only config.json is
    fetched whole, the weights a byte range at a time, and the slices equal the local file's."""
    from tests.tiny import make_hf_model, save_hf
    from tp_ollama.engine.model_files import FilesFrom, locate
    from tp_ollama.engine.protocol import FileRef, Load

    c, port = node0
    hf = save_hf(make_hf_model("llama"), tmp_path / "hf")
    files = []
    for path in sorted(hf.iterdir()):
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        c.files.offer(digest, path)
        files.append(FileRef(path.name, digest, path.stat().st_size))
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    source = FilesFrom("127.0.0.1", port, 1, (str(tmp_path / "store"),), cache=tmp_path / "cache")
    found = locate(Load("l", "/not/here", files=files), source)
    assert found.path != hf and found.source == "node 0"  # config.json already arrived
    ckpt = open_checkpoint(found.path, found.hook, found.identity)
    whole = open_checkpoint(hf)
    for name in sorted(whole.names()):
        shape = whole.shape(name)
        rows = (shape[0] // 2, shape[0])
        assert torch.equal(ckpt.read(name, torch.float32, rows=rows), whole.read(name, torch.float32, rows=rows))
        if len(shape) == 2:
            cols = (0, shape[1] // 2)
            assert torch.equal(ckpt.read(name, torch.float32, cols=cols), whole.read(name, torch.float32, cols=cols))
    weights = hf / "model.safetensors"
    # Half the rows of every tensor and half the columns of the 2-D ones: about 3/4 of the weights.
    assert found.received < 0.8 * weights.stat().st_size + (hf / "config.json").stat().st_size
    assert not (found.path / "generation_config.json").exists()  # what a rank never reads is not fetched
