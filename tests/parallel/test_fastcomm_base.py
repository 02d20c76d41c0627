"""tp_ollama.parallel.fastcomm_base: what both transports share. Op names for messages, the one association of
a rank-ordered sum, typed views made once per buffer set and kept bounded, and the store helper that names the
ranks it waited for."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tp_ollama.parallel.fastcomm_base import (
    OPS,
    CommError,
    ViewCache,
    op_name,
    store_get_all,
    sum_in_rank_order,
    too_big_message,
)


def test_op_codes_name_their_collective_and_an_unknown_code_is_shown_as_a_number():
    assert [op_name(code) for code in OPS.values()] == list(OPS)
    assert len(set(OPS.values())) == len(OPS)
    assert op_name(99) == "op 99"


def test_the_too_big_message_names_the_rank_the_size_and_the_limit():
    message = too_big_message(1, 5000, 4096)
    assert "rank 1 sends 5000 bytes" in message and "max_bytes=4096" in message
    assert "no torch.distributed process group" in message


def test_the_sum_is_taken_in_rank_order():
    # Magnitudes that differ per rank make float addition's association visible in the bits.
    gen = torch.Generator().manual_seed(3)
    views = [torch.randn(4096, generator=gen) * 10.0**p for p in range(3)]
    out = torch.empty(4096)
    sum_in_rank_order(views, out)
    assert torch.equal(out, (views[0] + views[1]) + views[2])
    assert not torch.equal(out, views[0] + (views[1] + views[2]))
    pair = torch.empty(4096)
    sum_in_rank_order(views[:2], pair)
    assert torch.equal(pair, views[0] + views[1])


def test_views_are_typed_windows_on_the_buffers_made_once_and_bounded():
    buffers = [
        [torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)],
        [torch.zeros(64, dtype=torch.uint8)],
    ]
    cache = ViewCache(buffers, limit=2)
    views = cache.get(0, torch.float32, 4)
    assert [v.dtype for v in views] == [torch.float32, torch.float32] and views[1].numel() == 4
    views[1].fill_(1.0)
    assert buffers[0][1][:16].view(torch.float32).tolist() == [1.0] * 4  # writes reach the buffer
    assert buffers[0][1][16:].sum() == 0
    assert cache.get(0, torch.float32, 4) is views
    cache.get(1, torch.int64, 2)
    cache.get(0, torch.bfloat16, 8)  # a third key: the oldest is dropped
    assert cache.get(0, torch.float32, 4) is not views


def test_the_store_helper_reads_every_key_or_names_the_ranks_it_waited_for():
    store = dist.HashStore()
    store.set("p/addr/0", "a")
    store.set("p/addr/1", "b")
    assert store_get_all(store, ["p/addr/0", "p/addr/1"], 5.0, "addresses", 0) == [b"a", b"b"]
    with pytest.raises(CommError, match=r"fastcomm setup: rank 0 waited 0\.2 s for addresses from rank\(s\) 2, 3"):
        store_get_all(store, [f"p/addr/{r}" for r in range(4)], 0.2, "addresses", 0)
