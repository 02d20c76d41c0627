"""The packed-weights cache: a second quantized load reads packed tensors instead of the checkpoint,
gives the same model, and never serves an entry for a changed file, another shard or a broken file."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import make_hf_model, prompt_ids, write_gguf
from tp_ollama.checkpoints import quantize
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.kernels.packed_cache import KEEP_ENTRIES, PackedCache, cache_key


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TP_OLLAMA_CACHE", str(root))
    return root / "packed"


def logits(model) -> torch.Tensor:
    """Six positions at once: few enough rows for the packed kernels, whose vector loads fault on
    misaligned weights (as memory-mapped cache entries would be)."""
    tokens = prompt_ids(6)
    cache = KVCache.for_model(model, batch=1, max_len=16)
    with torch.inference_mode():
        return model(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache)[0]


def count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = quantize.read_packed

    def spy(ckpt, name, param, packing, **kw):
        reads.append(name)
        return real(ckpt, name, param, packing, **kw)

    monkeypatch.setattr(quantize, "read_packed", spy)
    return reads


def test_second_load_comes_from_the_cache_and_is_the_same(tmp_path, cache_dir, monkeypatch):
    write_gguf(make_hf_model("llama"), tmp_path / "m.gguf", "llama", "Q8_0")
    reads = count_reads(monkeypatch)
    first = load_model(open_checkpoint(tmp_path / "m.gguf"), torch.float32, quant="int4")
    assert len(reads) == 3 * 7 + 2 and len(list(cache_dir.glob("*.safetensors"))) == 1
    reads.clear()
    second = load_model(open_checkpoint(tmp_path / "m.gguf"), torch.float32, quant="int4")
    assert reads == []  # nothing packed again
    assert torch.equal(logits(first), logits(second))
    # Another packing of the same file is another entry.
    load_model(open_checkpoint(tmp_path / "m.gguf"), torch.float32, quant="int8")
    assert len(reads) == 3 * 7 + 2 and len(list(cache_dir.glob("*.safetensors"))) == 2


def test_a_changed_file_is_packed_again(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(make_hf_model("llama", seed=0), path, "llama", "Q8_0")
    load_model(open_checkpoint(path), torch.float32, quant="int8")
    write_gguf(make_hf_model("llama", seed=1), path, "llama", "Q8_0")  # same name, new weights
    reads = count_reads(monkeypatch)
    fresh = load_model(open_checkpoint(path), torch.float32, quant="int8")
    assert len(reads) == 3 * 7 + 2
    reference = load_model(open_checkpoint(path), torch.float32)
    assert torch.nn.functional.cosine_similarity(logits(fresh), logits(reference), dim=-1).min() > 0.99


def test_a_broken_entry_is_rebuilt_not_served(tmp_path, cache_dir, monkeypatch):
    write_gguf(make_hf_model("llama"), tmp_path / "m.gguf", "llama", "Q8_0")
    first = load_model(open_checkpoint(tmp_path / "m.gguf"), torch.float32, quant="int8")
    (entry,) = cache_dir.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    again = load_model(open_checkpoint(tmp_path / "m.gguf"), torch.float32, quant="int8")
    assert torch.equal(logits(first), logits(again))
    assert entry.stat().st_size > 100  # rewritten whole


def test_keys_tell_shards_apart_and_old_entries_are_pruned(tmp_path):
    ckpt = tmp_path / "m.gguf"
    ckpt.write_bytes(b"GGUF")
    one = cache_key(ckpt, [("a", "int8", None)], "int8", torch.float32)
    assert one == cache_key(ckpt, [("a", "int8", None)], "int8", torch.float32)
    assert one != cache_key(ckpt, [("a", "int8", (0, 0, 64))], "int8", torch.float32)
    assert one != cache_key(ckpt, [("a", "int8", None)], "int8", torch.bfloat16)
    from tp_ollama.kernels.quant import quantize_int8

    weights = {"a": quantize_int8(torch.randn(64, 32)), "b": quantize_int8(torch.randn(64, 32), blocks=False)}
    for i in range(KEEP_ENTRIES + 3):
        PackedCache(tmp_path, f"k{i}").save(weights)
    assert len(list((tmp_path / "packed").glob("*.safetensors"))) == KEEP_ENTRIES
    loaded = PackedCache(tmp_path, f"k{KEEP_ENTRIES + 2}").load()
    assert loaded is not None and torch.equal(loaded["a"].q, weights["a"].q)
    assert [loaded[p].blocked for p in "ab"] == [weights["a"].blocked, False]  # the layout comes back too


def test_cached_tensors_are_aligned_for_the_kernels(tmp_path):
    """The packed kernels fault on weights that are not 64-byte aligned (seen with 4+ rows)."""
    from tp_ollama.kernels.quant import quantize_int4, quantize_int8

    odd = {
        "a": quantize_int8(torch.randn(64, 40)),
        "b": quantize_int4(torch.randn(64, 64)),
        "c": quantize_int8(torch.randn(64, 24)),
    }
    PackedCache(tmp_path, "odd").save(odd)
    loaded = PackedCache(tmp_path, "odd").load()
    assert loaded is not None
    for w in loaded.values():
        tensors = [w.q, w.scale] if w.kind == "int8" else [w.packed, w.scale_zero]
        assert all(t.data_ptr() % 64 == 0 for t in tensors), [t.data_ptr() % 64 for t in tensors]


def test_an_entry_cut_short_in_its_data_is_not_served(tmp_path):
    """Each tensor is read from the file into its own memory; one whose bytes end early makes the
    entry unreadable (rebuilt by the loader), never a tensor with a garbage tail."""
    from tp_ollama.kernels.quant import quantize_int8

    weights = {"a": quantize_int8(torch.randn(64, 64))}
    cache = PackedCache(tmp_path, "cut")
    cache.save(weights)
    loaded = cache.load()
    assert loaded is not None and torch.equal(loaded["a"].q, weights["a"].q)
    assert torch.equal(loaded["a"].scale, weights["a"].scale) and loaded["a"].group == weights["a"].group
    cache.path.write_bytes(cache.path.read_bytes()[:-10])
    assert cache.load() is None
