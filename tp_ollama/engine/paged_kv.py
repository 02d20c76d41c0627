"""Paged KV cache with prefix reuse, for serving many sequences at once.

Why pages. The per-request cache (kv_cache.py) reserves num_ctx positions per sequence up front, so a
batch of short requests pays for the longest one it might become. Here the KV memory of every layer is
one pool of fixed-size blocks (block_size positions each, vLLM-style) and a sequence holds a table of
block ids that grows as it does; memory is committed per block_size tokens actually used.

Why a prefix cache. Chat requests repeat long prefixes (system prompt, earlier turns). A block that is
full is never written again, so once a sequence finishes, its full blocks can keep their keys and
values and be handed, read-only, to the next sequence whose tokens start the same way. No
copy-on-write is needed: a sequence only ever writes positions past its cached prefix, and those land
in blocks it allocated itself.

How a block is found. A full block is keyed by a hash chain, hash((parent_hash, block_tokens)), so a
key names the whole prefix up to the block's end, not only its own tokens: the same 16 tokens after a
different prefix have different keys (their keys and values differ too). Hashes of ints and tuples
of ints do not depend on PYTHONHASHSEED, so every rank of a tensor-parallel group, each with its own
pool, computes the same keys and, fed the same calls, makes the same block choices. The block's own
tokens are compared as well on a match, so a hash collision can only pair blocks whose parents'
hashes collided first.

Life of a block. Exactly one of: free (on the free list, holds nothing useful); referenced (refcount
> 0, in some sequence's table); cached (refcount 0, still keyed in the prefix cache, evictable). When
allocation needs a block and the free list is empty, the least recently released cached block is
evicted. A finished sequence releases its blocks last-first, so within one sequence the tail goes
before the head: evicting a head block would strand its descendants, which can only be found through
it.

Writing, committing, reading. The engine reserves room, writes k/v at the slots of the new positions
in every layer, and only after the forward pass commits the token ids. Committing registers blocks
that just became full, so a block is never offered for reuse before its keys and values exist.
gather() reads a sequence back in position order with one index_select per tensor.

Limits. Sliding-window layers keep every position here too (attention masks by position, so results
are right; only the memory saving of a ring is lost). A block is reused only whole: a shared prefix
is matched to a block boundary, and never the whole prompt, since the last prompt token must run to
give logits.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from tp_ollama.errors import ConfigError
from tp_ollama.kernels.hugepages import zeros_on_touch
from tp_ollama.kernels.linear import activation_like, out_features

ROOT_HASH = 0  # parent hash of a sequence's first block; an int so it hashes the same in every process


def chain_hash(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class PrefixCache:
    """Full blocks keyed by their hash chain, and the LRU order of those no sequence references.

    Counters: hits (blocks reused), misses (full prompt blocks that could have been reused and were
    not: the first one looked up and not found, plus every block after it, since a chain cannot
    resume past a gap), evictions, hit_tokens (tokens that needed no prefill)."""

    def __init__(self) -> None:
        self._by_hash: dict[int, int] = {}  # chain hash -> block id
        self._key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> (chain hash, its tokens)
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with refcount 0, oldest first
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    def is_cached(self, block: int) -> bool:
        return block in self._key

    def lookup(self, tokens: Sequence[int], max_blocks: int, block_size: int) -> list[tuple[int, int]]:
        """The longest run of cached full blocks that starts `tokens`, at most max_blocks long, as
        (block id, chain hash) pairs. A pure query: no counters, no references."""
        found: list[tuple[int, int]] = []
        parent = ROOT_HASH
        for i in range(max_blocks):
            chunk = tuple(tokens[i * block_size : (i + 1) * block_size])
            h = chain_hash(parent, chunk)
            block = self._by_hash.get(h)
            if block is None or self._key[block][1] != chunk:
                break
            found.append((block, h))
            parent = h
        return found

    def match(self, tokens: Sequence[int], max_blocks: int, block_size: int) -> list[tuple[int, int]]:
        """lookup() for a sequence that will take these blocks: counts hits and misses."""
        found = self.lookup(tokens, max_blocks, block_size)
        self.hits += len(found)
        self.hit_tokens += len(found) * block_size
        self.misses += max_blocks - len(found)
        return found

    def register(self, block: int, h: int, tokens: tuple[int, ...]) -> bool:
        """Key a block that just became full. False when an equal block is cached already (two
        sequences computed the same prefix side by side); this copy then stays private."""
        if h in self._by_hash:
            return False
        self._by_hash[h] = block
        self._key[block] = (h, tokens)
        return True

    def release(self, block: int) -> None:
        """A cached block's last reference went away: it becomes the most recently used evictable."""
        self._lru[block] = None

    def take(self, block: int) -> None:
        """A cached block with refcount 0 gets a reference again: it is no longer evictable."""
        self._lru.pop(block, None)

    def evict(self) -> int:
        """Forget the least recently released cached block and return its id."""
        block, _ = self._lru.popitem(last=False)
        h, _ = self._key.pop(block)
        del self._by_hash[h]
        self.evictions += 1
        return block

    def check(self, num_blocks: int) -> None:
        _expect(len(self._by_hash) == len(self._key), f"{len(self._by_hash)} hashes for {len(self._key)} blocks")
        for block, (h, _) in self._key.items():
            _expect(0 <= block < num_blocks, f"cached block {block} outside the pool of {num_blocks}")
            _expect(self._by_hash.get(h) == block, f"block {block} is keyed but its hash maps elsewhere")
        for block in self._lru:
            _expect(block in self._key, f"evictable block {block} is not cached")


class BlockPool:
    """KV memory of every layer in fixed-size blocks shared by all sequences (vLLM-style).
    k[layer], v[layer]: (num_blocks, n_kv_heads_local, block_size, head_dim) tensors."""

    def __init__(
        self,
        layer_shapes: list[tuple[int, int]],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix_cache: bool = True,
    ) -> None:
        """layer_shapes: (n_kv_heads_local, head_dim) of each layer. prefix_cache=False: no block is
        ever shared, every prompt is computed in full (for comparing, or for strict isolation)."""
        if block_size < 1 or num_blocks < 1:
            raise ConfigError(
                f"a KV block pool needs block_size >= 1 and num_blocks >= 1, got {block_size} and {num_blocks}"
            )
        self.layer_shapes = list(layer_shapes)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        # Zeros, not empty: attention multiplies masked-out values by a zero weight, and 0 * NaN from
        # uninitialised memory would still poison the output. On the CPU the zeros are a fresh mapping
        # that commits memory as blocks are first written: the pool is a reservation, and a rank
        # holds the blocks its busiest moment used.
        zeros = zeros_on_touch if self.device.type == "cpu" else functools.partial(torch.zeros, device=self.device)
        self.k = [zeros((num_blocks, n, block_size, d), dtype=dtype) for n, d in layer_shapes]
        self.v = [zeros((num_blocks, n, block_size, d), dtype=dtype) for n, d in layer_shapes]
        self.prefix = PrefixCache()
        self.prefix_cache = prefix_cache
        self._refs = [0] * num_blocks
        # Blocks never handed out are 0 .. num_blocks-1 above `_touched`; `_free` is a stack of blocks
        # handed out before and released since, reused first, so that memory already committed is
        # what new sequences write.
        self._touched = 0
        self._free: list[int] = []
        # Past `soft_blocks` touched blocks, an evictable cached block is reused before a fresh one is
        # touched: cached prefixes live in the memory that the sequences' own need committed.
        self.soft_blocks = num_blocks
        self._live: dict[int, SequenceKV] = {}  # id(seq) -> seq, for check()

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        budget_bytes: int | None,
        block_size: int = 16,
        dtype: torch.dtype | None = None,
        prefix_cache: bool = True,
        tokens: int = 0,
    ) -> BlockPool:
        """As many blocks as budget_bytes holds for this model's (maybe sharded) attention layers; with
        budget_bytes None, the blocks that `tokens` positions need (one sequence of that length)."""
        shapes = []
        for block in model.model.layers:  # type: ignore[union-attr]
            attn = block.self_attn
            if getattr(block, "absent", False):  # another pipeline stage's layer: its KV lives there
                shapes.append((0, attn.head_dim))
                continue
            # local KV heads, from the (maybe sharded, maybe quantized) projection
            shapes.append((out_features(attn.k_proj) // attn.head_dim, attn.head_dim))
        if not shapes:
            raise ConfigError("the model has no attention layers to size a KV cache for")
        like = activation_like(model)
        dtype = dtype or like.dtype
        per_block = _bytes_per_block(shapes, block_size, dtype)
        if budget_bytes is None:
            budget_bytes = max(1, -(-tokens // block_size)) * per_block
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"KV cache budget of {budget_bytes} bytes holds no block: one block of {block_size} tokens "
                f"needs {per_block} bytes ({len(shapes)} layers, k and v, {dtype})"
            )
        return cls(shapes, num_blocks, block_size, dtype, like.device, prefix_cache)

    def bytes_per_block(self) -> int:
        return _bytes_per_block(self.layer_shapes, self.block_size, self.dtype)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks that n_tokens positions occupy. More than num_blocks: the request can never fit."""
        return -(-n_tokens // self.block_size)

    def num_free(self) -> int:
        """Blocks allocatable now, counting cached ones that no sequence references."""
        return len(self._free) + self.num_blocks - self._touched + self.prefix.num_evictable

    def bytes_touched(self) -> int:
        """KV memory written so far: on the CPU, what the pool holds of this rank's memory."""
        return self._touched * self.bytes_per_block()

    def num_used(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self.num_blocks - self.num_free()

    def cached_prefix(self, tokens: Sequence[int]) -> int:
        """How many tokens of this prompt new_sequence would find cached right now (a pure query, for
        planning; an allocation in between may evict some)."""
        return len(self.prefix.lookup(tokens, self._max_match(tokens), self.block_size)) * self.block_size

    def new_sequence(self, tokens: Sequence[int]) -> tuple[SequenceKV, int]:
        """A sequence for prompt `tokens`, starting on the longest cached prefix of full blocks (never
        the whole prompt: the last token must be computed). Returns it and the number of tokens that
        need no prefill; their positions are already written. Reserve room for the rest next."""
        max_blocks = self._max_match(tokens)
        found = self.prefix.match(tokens, max_blocks, self.block_size)
        for block, _ in found:
            self._ref(block)
        cached = len(found) * self.block_size
        seq = SequenceKV(self, [b for b, _ in found], list(tokens[:cached]), [h for _, h in found])
        self._live[id(seq)] = seq
        return seq, cached

    def stats(self) -> dict[str, int | bool]:
        """Occupancy and prefix-cache counters, JSON-ready."""
        return {
            "block_size": self.block_size,
            "blocks": self.num_blocks,
            "blocks_free": self.num_free(),
            "blocks_used": self.num_used(),
            "blocks_cached": len(self.prefix),
            "bytes_per_block": self.bytes_per_block(),
            "bytes_reserved": self.num_blocks * self.bytes_per_block(),
            "bytes_touched": self.bytes_touched(),
            "prefix_cache": self.prefix_cache,
            "prefix_hits": self.prefix.hits,
            "prefix_misses": self.prefix.misses,
            "prefix_hit_tokens": self.prefix.hit_tokens,
            "evictions": self.prefix.evictions,
        }

    def write(
        self, layer: int, block_ids: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store k, v (N, n_kv, D) for N positions at the slots from SequenceKV.slots (several
        sequences' slots may be concatenated)."""
        self.k[layer][block_ids, :, offsets] = k
        self.v[layer][block_ids, :, offsets] = v

    def check(self) -> None:
        """Raise AssertionError unless every block is exactly one of free, cached with refcount 0, or
        referenced, and refcounts match the live sequences' tables."""
        refs = [0] * self.num_blocks
        for seq in self._live.values():
            _expect(len(set(seq.table)) == len(seq.table), f"a sequence holds a block twice: {seq.table}")
            for block in seq.table:
                refs[block] += 1
            seq._check()
        _expect(refs == self._refs, "refcounts do not match the live sequences' tables")
        free = set(self._free) | set(range(self._touched, self.num_blocks))
        _expect(len(set(self._free)) == len(self._free), "a block is on the free list twice")
        _expect(all(b < self._touched for b in self._free), "a never-used block is on the free list")
        evictable = set(self.prefix._lru)
        for block in range(self.num_blocks):
            states = [block in free, block in evictable, refs[block] > 0]
            _expect(sum(states) == 1, f"block {block} is free/evictable/referenced = {states}")
            if block in free:
                _expect(not self.prefix.is_cached(block), f"free block {block} is still cached")
            if block in evictable:
                _expect(refs[block] == 0, f"evictable block {block} has {refs[block]} references")
        self.prefix.check(self.num_blocks)
        used = sum(r > 0 for r in refs)
        _expect(
            self.num_free() + used == self.num_blocks,
            f"{self.num_free()} free + {used} used != {self.num_blocks} blocks",
        )

    def _max_match(self, tokens: Sequence[int]) -> int:
        if not self.prefix_cache:
            return 0
        return max(len(tokens) - 1, 0) // self.block_size

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._touched < self.num_blocks and (self._touched < self.soft_blocks or not self.prefix.num_evictable):
            block = self._touched
            self._touched += 1
        else:
            block = self.prefix.evict()
        self._refs[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self.prefix.take(block)
        self._refs[block] += 1

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self.prefix.is_cached(block):
                self.prefix.release(block)
            else:
                self._free.append(block)


class SequenceKV:
    """One sequence's block table. Position p lives in block table[p // block_size] at offset
    p % block_size. Blocks before length // block_size are full (maybe shared, read-only); the rest
    belong to this sequence alone."""

    def __init__(self, pool: BlockPool, table: list[int], tokens: list[int], hashes: list[int]) -> None:
        self.pool = pool
        self.table = table
        self._tokens = tokens  # ids of the positions written and committed so far
        self._hashes = hashes  # chain hash of each full block, in order
        self._table_t: torch.Tensor | None = None  # table on the pool's device, rebuilt when it changes
        self._freed = False

    @property
    def length(self) -> int:
        """Positions written and committed so far."""
        return len(self._tokens)

    @property
    def capacity(self) -> int:
        """Positions the reserved blocks hold."""
        return len(self.table) * self.pool.block_size

    def reserve(self, n_new_tokens: int) -> bool:
        """Room for positions length..length+n-1, evicting cached blocks (LRU) if needed. False, with
        nothing changed, when the pool cannot fit them now."""
        self._alive()
        need = self.pool.blocks_for(self.length + n_new_tokens) - len(self.table)
        if need <= 0:
            return True
        if need > self.pool.num_free():
            return False
        self.table.extend(self.pool._allocate() for _ in range(need))
        self._table_t = None
        return True

    def slots(self, start_pos: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_ids, offsets), each a LongTensor (n,), of positions start_pos..start_pos+n-1, for
        BlockPool.write. Positions already committed cannot be written: they may be shared."""
        self._alive()
        if start_pos < self.length or start_pos + n > self.capacity:
            raise ValueError(
                f"cannot write positions {start_pos}..{start_pos + n - 1}: {self.length} are committed "
                f"and {self.capacity} reserved"
            )
        pos = torch.arange(start_pos, start_pos + n, device=self.pool.device)
        return self._table()[pos // self.pool.block_size], pos % self.pool.block_size

    def commit(self, tokens_written: Sequence[int]) -> None:
        """Record the ids of the positions just written (after their k/v are stored in every layer);
        blocks that became full join the prefix cache."""
        self._alive()
        if self.length + len(tokens_written) > self.capacity:
            raise ValueError(
                f"cannot commit {len(tokens_written)} tokens after {self.length}: only {self.capacity} reserved"
            )
        bs = self.pool.block_size
        first = self.length // bs
        self._tokens.extend(tokens_written)
        for i in range(first, self.length // bs):
            chunk = tuple(self._tokens[i * bs : (i + 1) * bs])
            h = chain_hash(self._hashes[-1] if i else ROOT_HASH, chunk)
            self._hashes.append(h)
            if self.pool.prefix_cache:
                self.pool.prefix.register(self.table[i], h, chunk)

    def gather(self, layer: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..length-1 (default: the committed ones), each
        (n_kv, length, D), in position order. Pass a larger length to include positions written
        this step but not committed yet."""
        n = self.length if length is None else length
        if n > self.capacity:
            raise ValueError(f"cannot read {n} positions: {self.capacity} reserved")
        idx = self._table()[: self.pool.blocks_for(n)]
        k = _flatten_blocks(self.pool.k[layer].index_select(0, idx))  # (n_kv, blocks * block_size, D)
        v = _flatten_blocks(self.pool.v[layer].index_select(0, idx))
        return k[:, :n], v[:, :n]

    def free(self) -> None:
        """Drop this sequence's references. Full registered blocks stay cached for reuse; the rest go
        back to the free list. Calling it again does nothing."""
        if self._freed:
            return
        self._freed = True
        for block in reversed(self.table):  # tail first: see "Life of a block" above
            self.pool._unref(block)
        self.table = []
        self._table_t = None
        self.pool._live.pop(id(self), None)

    def _table(self) -> torch.Tensor:
        if self._table_t is None:
            self._table_t = torch.tensor(self.table, dtype=torch.long, device=self.pool.device)
        return self._table_t

    def _alive(self) -> None:
        if self._freed:
            raise ValueError("this sequence's KV blocks were freed")

    def _check(self) -> None:
        bs = self.pool.block_size
        _expect(self.length <= self.capacity, f"{self.length} tokens committed in {self.capacity} reserved")
        _expect(len(self._hashes) == self.length // bs, f"{len(self._hashes)} hashes for {self.length} tokens")
        for block in self.table[self.length // bs :]:
            _expect(self.pool._refs[block] == 1, f"block {block} still being written is shared")
            _expect(not self.pool.prefix.is_cached(block), f"block {block} still being written is cached")


def _flatten_blocks(x: torch.Tensor) -> torch.Tensor:
    """(blocks, n_kv, bs, D) -> (n_kv, blocks * bs, D), positions in table order."""
    nb, n_kv, bs, d = x.shape
    return x.transpose(0, 1).reshape(n_kv, nb * bs, d)


def _bytes_per_block(layer_shapes: list[tuple[int, int]], block_size: int, dtype: torch.dtype) -> int:
    return sum(2 * n_kv * block_size * head_dim * dtype.itemsize for n_kv, head_dim in layer_shapes)


def _expect(ok: bool, message: str) -> None:
    # NOTE: not `assert`, which python -O strips; check() is called by tests and debugging code.
    if not ok:
        raise AssertionError(message)
