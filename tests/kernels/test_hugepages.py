"""Large packed tensors live in 2 MiB-aligned mappings advised for huge pages; small ones are plain."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.tiny import make_hf_model, save_hf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.kernels import hugepages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")


@linux
def test_large_tensors_start_on_a_huge_page_and_copy_exactly():
    src = torch.arange(3 * hugepages.MIN_BYTES // 4, dtype=torch.float32).view(-1, 1024)
    out = hugepages.copy_of(src)
    assert out.data_ptr() % hugepages.PAGE == 0
    assert out.dtype == src.dtype and out.shape == src.shape and out.is_contiguous()
    assert torch.equal(out, src)
    out[0, 0] = -1.0  # its own memory, writable
    assert src[0, 0] == 0.0


def test_small_tensors_are_ordinary():
    t = hugepages.empty((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16
    assert t.untyped_storage().nbytes() == 3 * 5 * 2  # no mapping padded out to a large page


@linux
def test_loaded_packed_weights_take_them(tmp_path, monkeypatch):
    """Freshly packed and cached weights alike: both loads put a large tensor on a huge page."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1 << 12)  # the tiny model's tensors count as large
    monkeypatch.setenv("TP_OLLAMA_CACHE", str(tmp_path / "cache"))
    path = save_hf(make_hf_model("llama"), tmp_path / "model")
    for _ in range(2):  # the second load reads the packed-weights cache the first one wrote
        model = load_model(open_checkpoint(path), torch.float32, quant="int8")
        q = model.model.embed_tokens.qweight.q
        assert q.data_ptr() % hugepages.PAGE == 0


@linux
def test_zeros_on_touch_read_as_zeros_and_commit_only_what_is_written():
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    pool = hugepages.zeros_on_touch((256, 1 << 20), torch.float32)  # 1 GiB reserved
    assert pool.shape == (256, 1 << 20) and pool.dtype == torch.float32
    assert proc.memory_info().rss - before < 64 << 20
    pool[:4] = 1.0  # 16 MiB written
    grown = proc.memory_info().rss - before
    assert 16 << 20 <= grown < 80 << 20
    assert float(pool[:4].sum()) == 4 * (1 << 20) and float(pool[4:8].abs().sum()) == 0.0
    assert hugepages.zeros_on_touch((0, 3), torch.bfloat16).shape == (0, 3)
