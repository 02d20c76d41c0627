"""Paged KV cache: exact read-back under random interleavings, prefix reuse, LRU eviction, block
accounting, and sizing from a model's (sharded) weights."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from tp_ollama.engine.paged_kv import BlockPool, SequenceKV
from tp_ollama.errors import ConfigError
from tp_ollama.models.common import attention

# Two layers of different shapes, as a sharded or mixed-head-dim model has.
SHAPES = [(2, 4), (1, 6)]

_values: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}


def _kv(layer: int, prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The k, v (n_kv, D) a model would write at position len(prefix)-1: a function of the whole
    prefix, as real keys are, so a block reused after the wrong prefix shows up as wrong values."""
    key = (layer, prefix)
    if key not in _values:
        g = torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF)
        n_kv, d = SHAPES[layer]
        _values[key] = (torch.randn(n_kv, d, generator=g), torch.randn(n_kv, d, generator=g))
    return _values[key]


def _expected(layer: int, tokens: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (n_kv, n, D) keys and values of positions 0..n-1."""
    n_kv, d = SHAPES[layer]
    if n == 0:
        return torch.zeros(n_kv, 0, d), torch.zeros(n_kv, 0, d)
    pairs = [_kv(layer, tuple(tokens[: p + 1])) for p in range(n)]
    return torch.stack([k for k, _ in pairs], dim=1), torch.stack([v for _, v in pairs], dim=1)


def _pool(num_blocks: int, block_size: int) -> BlockPool:
    return BlockPool(SHAPES, num_blocks, block_size, torch.float32, "cpu")


def _write(pool: BlockPool, seq: SequenceKV, tokens: Sequence[int], n: int) -> None:
    """Reserve, write and commit the next n positions of `tokens`, as the engine does in one step."""
    start = seq.length
    assert seq.reserve(n)
    block_ids, offsets = seq.slots(start, n)
    for layer in range(len(SHAPES)):
        k, v = _expected(layer, tokens[: start + n], start + n)
        pool.write(layer, block_ids, offsets, k[:, start:].transpose(0, 1), v[:, start:].transpose(0, 1))
    seq.commit(tokens[start : start + n])


def _prefill(pool: BlockPool, tokens: Sequence[int]) -> SequenceKV:
    seq, cached = pool.new_sequence(tokens)
    _write(pool, seq, tokens, len(tokens) - cached)
    return seq


def _assert_reads_back(seq: SequenceKV, tokens: Sequence[int]) -> None:
    for layer in range(len(SHAPES)):
        k, v = seq.gather(layer)
        want_k, want_v = _expected(layer, tokens, seq.length)
        assert torch.equal(k, want_k)
        assert torch.equal(v, want_v)


# --- exactness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_gather_returns_exactly_what_slots_wrote_under_random_interleavings(seed: int) -> None:
    rng = random.Random(seed)
    pool = _pool(num_blocks=40, block_size=rng.choice([1, 3, 4, 16]))
    stems = [[rng.randrange(50) for _ in range(rng.randrange(0, 30))] for _ in range(3)]
    live: list[tuple[SequenceKV, list[int]]] = []
    reused = 0
    for _ in range(150):
        if len(live) < 4 and rng.random() < 0.3:
            prompt = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            tokens = prompt + [rng.randrange(50) for _ in range(rng.randrange(0, 40))]  # prompt + "decode"
            seq, cached = pool.new_sequence(prompt)
            reused += cached
            assert seq.length == cached
            live.append((seq, tokens))
        elif live:
            seq, tokens = rng.choice(live)
            n = min(rng.randrange(1, 12), len(tokens) - seq.length)
            if n == 0 or not seq.reserve(n):
                seq.free()  # finished, or preempted for lack of room
                live = [(s, t) for s, t in live if s is not seq]
                continue
            _write(pool, seq, tokens, n)
        for seq, tokens in live:
            _assert_reads_back(seq, tokens)
        pool.check()
    assert reused > 0  # the stems really were shared
    for seq, _ in live:
        seq.free()
    pool.check()
    assert pool.num_free() == pool.num_blocks


def test_gather_can_include_positions_written_this_step_before_commit() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    tokens = list(range(10))
    seq = _prefill(pool, tokens[:6])
    assert seq.reserve(3)
    block_ids, offsets = seq.slots(6, 3)
    for layer in range(len(SHAPES)):
        k, v = _expected(layer, tokens, 9)
        pool.write(layer, block_ids, offsets, k[:, 6:].transpose(0, 1), v[:, 6:].transpose(0, 1))
        got_k, got_v = seq.gather(layer, length=9)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert seq.length == 6


def test_slots_are_vectorised_lookups_of_the_block_table() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    seq, _ = pool.new_sequence([1, 2, 3])
    assert seq.reserve(10)
    block_ids, offsets = seq.slots(2, 7)
    table = torch.tensor(seq.table)
    positions = torch.arange(2, 9)
    assert block_ids.dtype == offsets.dtype == torch.long
    assert torch.equal(block_ids, table[positions // 4])
    assert torch.equal(offsets, positions % 4)


def test_slots_refuses_committed_or_unreserved_positions() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    seq = _prefill(pool, list(range(6)))
    with pytest.raises(ValueError, match="6 are committed"):
        seq.slots(5, 1)  # would overwrite a written (maybe shared) position
    with pytest.raises(ValueError, match="8 reserved"):
        seq.slots(6, 3)


class PagedBatch:
    """Test helper: Several sequences' tables padded into one (B, max_blocks) index so that each layer reads the
    whole batch with one index_select per tensor. Padding points at block 0 and is masked by k_pos."""

    def __init__(self, pool: BlockPool, seqs: Sequence[SequenceKV], lengths: Sequence[int] | None = None) -> None:
        lens = [s.length for s in seqs] if lengths is None else list(lengths)
        if len(lens) != len(seqs):
            raise ValueError(f"{len(lens)} lengths for {len(seqs)} sequences")
        for seq, n in zip(seqs, lens, strict=True):
            if n > seq.capacity:
                raise ValueError(f"cannot read {n} positions: {seq.capacity} reserved")
        self.pool = pool
        self.width = max(lens, default=0)  # S
        nb = pool.blocks_for(self.width)
        index = torch.zeros(len(seqs), nb, dtype=torch.long)
        for row, seq in enumerate(seqs):
            used = seq.table[:nb]
            index[row, : len(used)] = torch.tensor(used, dtype=torch.long)
        self.index = index.flatten().to(pool.device)  # (B * nb,)
        self.shape = (len(seqs), nb)
        pos = torch.arange(self.width, device=pool.device).expand(len(seqs), -1)  # (B, S)
        ends = torch.tensor(lens, dtype=torch.long, device=pool.device)[:, None]  # (B, 1)
        self.k_pos = torch.where(pos < ends, pos, torch.full_like(pos, -1))  # -1: not this sequence's

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, n_kv, S, D) and k_pos (B, S), as models.common.attention takes them."""
        b, nb = self.shape
        k = self.pool.k[layer].index_select(0, self.index)  # (B * nb, n_kv, bs, D)
        v = self.pool.v[layer].index_select(0, self.index)
        _, n_kv, bs, d = k.shape
        k = k.view(b, nb, n_kv, bs, d).transpose(1, 2).reshape(b, n_kv, nb * bs, d)  # (B, n_kv, nb*bs, D)
        v = v.view(b, nb, n_kv, bs, d).transpose(1, 2).reshape(b, n_kv, nb * bs, d)
        return k[:, :, : self.width], v[:, :, : self.width], self.k_pos


def test_batch_gather_pads_with_empty_positions_and_feeds_attention() -> None:
    pool = _pool(num_blocks=16, block_size=4)
    prompts = [list(range(7)), list(range(100, 113)), [5]]
    seqs = [_prefill(pool, p) for p in prompts]
    batch = PagedBatch(pool, seqs)
    for layer, (n_kv, d) in enumerate(SHAPES):
        k, v, k_pos = batch.gather(layer)
        assert k.shape == v.shape == (3, n_kv, 13, d)
        q = torch.randn(3, 2 * n_kv, 1, d)
        q_pos = torch.tensor([[len(p) - 1] for p in prompts])
        out = attention(q, k, v, q_pos, k_pos, scale=0.5, window=None)
        for row, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
            assert k_pos[row].tolist() == list(range(len(prompt))) + [-1] * (13 - len(prompt))
            want_k, want_v = seq.gather(layer)
            assert torch.equal(k[row, :, : len(prompt)], want_k)
            alone = attention(
                q[row : row + 1],
                want_k[None],
                want_v[None],
                q_pos[row : row + 1],
                k_pos[row : row + 1, : len(prompt)],
                0.5,
                None,
            )
            torch.testing.assert_close(out[row : row + 1], alone)


# --- prefix reuse and eviction ---------------------------------------------------------------------------


def test_second_sequence_reuses_the_full_blocks_of_a_shared_prefix() -> None:
    pool = _pool(num_blocks=16, block_size=16)
    shared = list(range(40))
    first = _prefill(pool, [*shared, 900, 901])
    second, cached = pool.new_sequence([*shared, 700, 701, 702])
    assert cached == 32
    assert second.table[:2] == first.table[:2]
    assert (pool.prefix.hits, pool.prefix.hit_tokens) == (2, 32)
    for layer in range(len(SHAPES)):
        assert torch.equal(second.gather(layer)[0], first.gather(layer)[0][:, :32])
        assert torch.equal(second.gather(layer)[1], first.gather(layer)[1][:, :32])
    _write(pool, second, [*shared, 700, 701, 702], 11)
    _assert_reads_back(second, [*shared, 700, 701, 702])
    _assert_reads_back(first, [*shared, 900, 901])
    pool.check()


def test_match_never_covers_the_whole_prompt() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    _prefill(pool, list(range(8))).free()
    misses = pool.prefix.misses
    seq, cached = pool.new_sequence(list(range(8)))
    assert cached == 4  # the last token must run to give logits, so its block is recomputed
    assert (pool.prefix.hits, pool.prefix.misses - misses) == (1, 0)
    seq.free()
    _, cached = pool.new_sequence(list(range(9)))
    assert cached == 8


def test_same_tokens_after_a_different_prefix_are_not_reused() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    _prefill(pool, [1, 2, 3, 4, 5, 6, 7, 8, 9]).free()
    misses = pool.prefix.misses
    _, cached = pool.new_sequence([0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert cached == 0
    assert (pool.prefix.hits, pool.prefix.misses - misses) == (0, 2)


def test_a_prefix_computed_twice_side_by_side_is_cached_once() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    a, _ = pool.new_sequence(list(range(5)))
    b, _ = pool.new_sequence(list(range(5)))  # a has committed nothing yet: no hit
    _write(pool, a, list(range(5)), 5)
    _write(pool, b, list(range(5)), 5)
    assert len(pool.prefix) == 1
    a.free()
    b.free()  # b's copy of the block was never cached: it goes straight back to the free list
    assert (pool.prefix.num_evictable, pool.num_free()) == (1, 8)
    pool.check()


def test_cached_prefix_predicts_new_sequence_without_touching_anything() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    shared = list(range(10))
    _prefill(pool, shared).free()
    before = pool.stats()
    assert pool.cached_prefix([*shared, 50]) == 8
    assert pool.cached_prefix([0, 1, 2, 3, 9]) == 4
    assert pool.cached_prefix([7]) == 0
    assert pool.stats() == before
    _, cached = pool.new_sequence([*shared, 50])
    assert cached == 8
    pool.check()


def test_prefix_cache_off_shares_nothing() -> None:
    pool = BlockPool(SHAPES, 8, 4, torch.float32, "cpu", prefix_cache=False)
    _prefill(pool, list(range(10))).free()
    seq, cached = pool.new_sequence(list(range(10)))
    assert (cached, pool.cached_prefix(list(range(10))), len(pool.prefix)) == (0, 0, 0)
    assert (pool.prefix.hits, pool.prefix.misses) == (0, 0)
    seq.free()
    pool.check()
    assert pool.num_free() == 8


def test_stats_report_occupancy_and_counters() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    _prefill(pool, list(range(10))).free()
    seq, _ = pool.new_sequence(list(range(10)))
    assert seq.reserve(2)
    assert pool.stats() == {
        "block_size": 4,
        "blocks": 8,
        "blocks_free": 5,
        "blocks_used": 3,
        "blocks_cached": 2,
        "bytes_per_block": 2 * 4 * 4 * (2 * 4 + 1 * 6),
        "bytes_reserved": 8 * 2 * 4 * 4 * (2 * 4 + 1 * 6),
        "bytes_touched": 3 * 2 * 4 * 4 * (2 * 4 + 1 * 6),
        "prefix_cache": True,
        "prefix_hits": 2,
        "prefix_misses": 2,
        "prefix_hit_tokens": 8,
        "evictions": 0,
    }


def test_released_blocks_are_reused_before_fresh_ones_are_touched() -> None:
    pool = _pool(num_blocks=64, block_size=4)
    for start in range(0, 400, 10):  # 40 distinct prompts of 3 blocks, one after another, no cache
        pool.prefix_cache = False
        _prefill(pool, list(range(start, start + 10))).free()
    assert pool.bytes_touched() == 3 * pool.bytes_per_block()
    pool.check()


def test_past_the_soft_limit_cached_blocks_are_evicted_before_fresh_ones_are_touched() -> None:
    pool = _pool(num_blocks=64, block_size=4)
    pool.soft_blocks = 6
    for start in range(0, 200, 10):  # distinct prompts: each leaves 2 full blocks in the prefix cache
        _prefill(pool, list(range(start, start + 10))).free()
    assert pool.bytes_touched() == 6 * pool.bytes_per_block()
    assert pool.prefix.evictions > 0
    # a sequence that needs more than the soft limit still gets its blocks, up to the pool's size
    seq, _ = pool.new_sequence(list(range(1000, 1001)))
    assert seq.reserve(40 * 4)
    assert pool.bytes_touched() > 6 * pool.bytes_per_block()
    pool.check()


def test_lru_eviction_frees_the_least_recently_released_blocks_first() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19]
    _prefill(pool, a).free()
    _prefill(pool, b).free()
    seq, cached = pool.new_sequence(a)  # touching a makes b's blocks the least recently used
    assert cached == 8
    seq.free()
    assert (pool.num_free(), pool.prefix.num_evictable) == (8, 4)

    other, _ = pool.new_sequence([99])
    assert other.reserve(6 * 4)  # 4 free blocks, then 2 evicted
    assert pool.prefix.evictions == 2
    pool.check()
    seq, cached = pool.new_sequence(a)
    assert cached == 8
    _assert_reads_back(seq, a)
    _, cached = pool.new_sequence(b)
    assert cached == 0


def test_a_finished_sequence_loses_its_tail_blocks_before_its_head() -> None:
    pool = _pool(num_blocks=4, block_size=4)
    a = list(range(13))
    _prefill(pool, a).free()  # three full blocks cached, the partial fourth freed
    other, _ = pool.new_sequence([99])
    assert other.reserve(2 * 4)  # the free block, then one eviction: a's last block, not its first
    assert pool.prefix.evictions == 1
    other.free()
    assert pool.cached_prefix(a) == 8


def test_blocks_in_use_are_never_evicted() -> None:
    pool = _pool(num_blocks=8, block_size=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    _prefill(pool, a).free()
    holder, cached = pool.new_sequence(a)  # references a's two cached blocks again
    assert cached == 8
    other, _ = pool.new_sequence([99])
    assert other.reserve(6 * 4)
    assert pool.prefix.evictions == 0
    assert pool.num_free() == 0
    table = list(other.table)
    assert not other.reserve(6 * 4 + 1)  # would need a block in use: refused, nothing changed
    assert other.table == table
    assert pool.prefix.evictions == 0
    _assert_reads_back(holder, a)
    pool.check()


def test_reserve_that_cannot_fit_changes_nothing() -> None:
    pool = _pool(num_blocks=4, block_size=4)
    seq, _ = pool.new_sequence([1, 2])
    assert seq.reserve(8)
    assert not seq.reserve(17)
    assert len(seq.table) == 2
    assert pool.num_free() == 2
    assert seq.reserve(16)
    assert pool.num_free() == 0


# --- accounting ------------------------------------------------------------------------------------------


def test_random_mix_of_operations_keeps_every_block_accounted_for() -> None:
    rng = random.Random(7)
    pool = _pool(num_blocks=24, block_size=4)
    stems = [[rng.randrange(20) for _ in range(n)] for n in (0, 6, 13)]
    live: list[tuple[SequenceKV, list[int]]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            tokens = rng.choice(stems) + [rng.randrange(20) for _ in range(rng.randrange(1, 30))]
            live.append((pool.new_sequence(tokens)[0], tokens))
        elif op < 0.75 and live:
            seq, tokens = rng.choice(live)
            n = rng.randrange(1, 10)
            free_before = pool.num_free()
            if seq.reserve(n):
                seq.commit((tokens + [rng.randrange(20) for _ in range(n)])[seq.length : seq.length + n])
            else:
                assert pool.num_free() == free_before
        elif live:
            seq, _ = live.pop(rng.randrange(len(live)))
            seq.free()
        pool.check()
        assert pool.num_free() + pool.num_used() == pool.num_blocks
    assert pool.prefix.hits > 0 and pool.prefix.evictions > 0
    for seq, _ in live:
        seq.free()
    pool.check()
    assert pool.num_free() == pool.num_blocks


def test_free_twice_is_harmless_and_a_freed_sequence_cannot_grow() -> None:
    pool = _pool(num_blocks=4, block_size=4)
    seq = _prefill(pool, [1, 2, 3, 4, 5])
    seq.free()
    seq.free()
    pool.check()
    assert pool.num_free() == 4
    with pytest.raises(ValueError, match="freed"):
        seq.reserve(1)


def test_check_catches_a_corrupted_refcount() -> None:
    pool = _pool(num_blocks=4, block_size=4)
    seq = _prefill(pool, [1, 2, 3, 4, 5])
    pool._refs[seq.table[0]] += 1
    with pytest.raises(AssertionError, match="refcounts"):
        pool.check()


# --- sizing ----------------------------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, n_kv_local: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.k_proj = nn.Linear(8, n_kv_local * head_dim, bias=False, dtype=torch.bfloat16)


class _Layer(nn.Module):
    def __init__(self, n_kv_local: int, head_dim: int) -> None:
        super().__init__()
        self.self_attn = _Attn(n_kv_local, head_dim)


class _Model(nn.Module):
    """Just the attribute paths for_model reads: model.model.layers[i].self_attn.k_proj for the KV
    heads, model.model.norm for the activation dtype and device."""

    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Layer(n, d) for n, d in shapes)
        self.model.norm = nn.RMSNorm(8, dtype=torch.bfloat16)


def test_for_model_sizes_the_pool_from_local_weights_and_the_budget() -> None:
    model = _Model([(2, 8), (2, 8), (1, 16)])  # a rank's shard: 2 of 4 KV heads, and a mixed layer
    per_block = 2 * 4 * 2 * (2 * 8 + 2 * 8 + 1 * 16)  # k and v, block_size 4, bf16
    pool = BlockPool.for_model(model, budget_bytes=10 * per_block + 1, block_size=4)
    assert pool.bytes_per_block() == per_block
    assert pool.num_blocks == 10
    assert [tuple(k.shape) for k in pool.k] == [(10, 2, 4, 8), (10, 2, 4, 8), (10, 1, 4, 16)]
    assert pool.k[0].dtype == torch.bfloat16
    assert BlockPool.for_model(model, 10 * per_block, block_size=4, dtype=torch.float32).num_blocks == 5
    assert not BlockPool.for_model(model, per_block, block_size=4, prefix_cache=False).prefix_cache


def test_for_model_budget_below_one_block_is_a_config_error_with_numbers() -> None:
    model = _Model([(2, 8)])
    with pytest.raises(ConfigError, match=r"budget of 100 bytes .* block of 16 tokens needs 1024 bytes"):
        BlockPool.for_model(model, budget_bytes=100)


def test_blocks_for_detects_requests_that_can_never_fit() -> None:
    pool = _pool(num_blocks=4, block_size=16)
    assert [pool.blocks_for(n) for n in (0, 1, 16, 17, 64, 65)] == [0, 1, 1, 2, 4, 5]
    assert pool.blocks_for(65) > pool.num_blocks
