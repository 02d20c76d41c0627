"""Where a rank of a node other than node 0 reads a model: its own store by digest, else byte ranges
from node 0 (here a test double answering from local files by digest and counting what it was asked),
kept for later; with copies kept, a checked blob of the node's store. The real service is tested in
tests/membership/test_files.py."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from tp_ollama.checkpoints.loader import open_checkpoint
from tp_ollama.engine.model_files import FilesFrom, locate
from tp_ollama.engine.protocol import FileRef, Load
from tp_ollama.engine.state import EngineJob, EngineState
from tp_ollama.parallel.comm import SoloComm
from tp_ollama.store.embedded import resolve_model


class Node0Files:
    """Test double of node 0's file service: files by digest, answered from this machine's disk."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.sent = 0

    def offer(self, path: Path) -> FileRef:
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        self.files[digest] = path
        return FileRef(path.name, digest, path.stat().st_size)

    def fetch(self, file_id: str, ranges: Sequence[tuple[int, int]]) -> bytes:
        data = self.files[file_id].read_bytes()
        self.sent += sum(b - a for a, b in ranges)
        return b"".join(data[a:b] for a, b in ranges)


def other_smollm2(tmp_path: Path) -> Path:
    """The embedded SmolLM2 GGUF with bytes added: a file no store has (the package is installed here)."""
    path = tmp_path / "other.gguf"
    path.write_bytes(resolve_model("smollm2:135m").read_bytes() + b"\0" * 64)
    return path


def test_a_file_in_the_nodes_store_is_read_there(tmp_path):
    node0 = Node0Files()
    gguf = other_smollm2(tmp_path)
    ref = node0.offer(gguf)
    store = tmp_path / "store"
    (store / "blobs").mkdir(parents=True)
    shutil.copy(gguf, store / "blobs" / ref.digest.replace(":", "-"))
    source = FilesFrom(1, lambda: node0.fetch, (str(store),), cache=tmp_path / "cache")
    found = locate(Load("l", "/elsewhere.gguf", files=[FileRef("", ref.digest, ref.size)]), source)
    assert found.path == store / "blobs" / ref.digest.replace(":", "-") and found.source == "store"
    assert found.hook is None and node0.sent == 0


def test_a_node_that_keeps_copies_adds_the_file_to_its_store(tmp_path):
    """A rank whose node keeps full copies (models.replication.min_replicas): it loads from what it
    receives, then the whole file, checked, becomes a blob of its store; the next load reads it."""
    node0 = Node0Files()
    gguf = other_smollm2(tmp_path)
    ref = node0.offer(gguf)
    store = tmp_path / "store"
    source = FilesFrom(1, lambda: node0.fetch, (str(store),), cache=tmp_path / "cache", keep_copy=True)
    state = EngineState(EngineJob(kv_cache_bytes=1 << 22, files_from=source), SoloComm())
    cmd = Load("l1", "/nowhere/on/this/node.gguf", num_ctx=256, files=[FileRef("", ref.digest, ref.size)])
    weights = state.load(cmd).layout[0]
    assert weights["node"] == 1 and weights["weights_from"] == "node 0" and weights["received_bytes"] == ref.size
    blob = store / "blobs" / ref.digest.replace(":", "-")
    assert blob.read_bytes() == gguf.read_bytes()
    state.unload()
    again = EngineState(EngineJob(kv_cache_bytes=1 << 22, files_from=source), SoloComm())
    weights = again.load(Load("l2", cmd.path, num_ctx=256, files=cmd.files)).layout[0]
    assert weights["weights_from"] == "store" and weights["received_bytes"] == 0 and node0.sent == ref.size


def test_a_rank_reads_its_slices_of_a_safetensors_model(tmp_path):
    """An HF directory (a tiny random Llama): config.json arrives whole, the weights a byte range at a
    time, files a rank never reads not at all, and the slices equal the local file's."""
    from tests.tiny import make_hf_model, save_hf

    node0 = Node0Files()
    hf = save_hf(make_hf_model("llama"), tmp_path / "hf")
    files = [node0.offer(path) for path in sorted(hf.iterdir())]
    source = FilesFrom(1, lambda: node0.fetch, (str(tmp_path / "store"),), cache=tmp_path / "cache")
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
    assert node0.sent == found.received < 0.8 * weights.stat().st_size + (hf / "config.json").stat().st_size
    assert not (found.path / "generation_config.json").exists()  # what a rank never reads is not fetched
