"""The decode step of a whole model in one native call (`tpo_decode_logits`, `tpo_decode_paged_logits`
and their hidden-state forms `tpo_decode`, `tpo_decode_paged` in kernels/cpu_kernels.c).

A decode step of gemma3:270m runs ~1000 torch operators and kernel calls of a few microseconds each:
on two cores that dispatch costs about as much as reading the weights. Where every linear layer of a
Llama-family or Gemma 3 model is on a native kernel (int4 in the native layout, int8), a decode step
goes from the token id to the logits in one call (`logits`, `decode_paged(..., logits=True)`): the
embedding row, all layers, the final norm and the LM head, for one sequence over its contiguous KV
cache (tp_ollama.engine.kv_cache: `generate`, the benchmarks) or the server's batch of sequences over
the paged KV pools (tp_ollama.engine.paged_kv). Where the embedding or head is not one it reads (a
float head, logit soft-capping: `takes_tokens` is False), the layers still run in one call and the
modules embed and project.

The native step computes what the torch modules compute, operation by operation, rounding to bfloat16
where they round (tests/models/test_native_decode.py holds the two paths together). Prefill, sharded
models (their collectives run in module hooks) and float weights take the modules as before.
TP_OLLAMA_NATIVE_DECODE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
from torch import nn

from tp_ollama.kernels import native
from tp_ollama.kernels.linear import QuantEmbedding, QuantLinear, activation_like, out_features
from tp_ollama.kernels.quant import Int8Weight, QuantWeight, native_int4
from tp_ollama.models.native_structs import (
    EMBED_BF16,
    EMBED_F32,
    EMBED_QUANT,
    REDUCE_FN,
    TpoDecoder,
    TpoLayer,
    TpoLinear,
    binding_layout,
    library_layout,
)

ENV_SWITCH = "TP_OLLAMA_NATIVE_DECODE"
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def _weight(module: nn.Module | None) -> QuantWeight | None:
    """The quantized weight of a linear layer where a native kernel takes it, else None."""
    return _native_weight(module.qweight) if isinstance(module, QuantLinear) else None


def _native_weight(w: QuantWeight) -> QuantWeight | None:
    """w where a native kernel takes it, else None."""
    if isinstance(w, Int8Weight):
        return w if w.native_matmul() is not None else None
    if not native_int4():  # int4 codes in torch's layout, which the native kernel does not read
        return None
    try:
        w.native_matmul()  # checks the shapes the kernel takes
    except ValueError:
        return None
    return w


def _parts(module: nn.Module, names: tuple[str, ...]) -> list[nn.Module] | None:
    """The layers that compute `names`' outputs in order: the fused one alone, or each."""
    fused = module._modules.get("fused")
    if fused is not None:
        return [fused]
    parts = [module._modules.get(n) for n in names]
    return None if any(p is None for p in parts) else parts  # type: ignore[return-value]


def _sizes(module: nn.Module, names: tuple[str, ...]) -> tuple[int, ...]:
    """Output sizes of `names` (a fused layer records them)."""
    fused_sizes = getattr(module, "fused_sizes", None)
    if module._modules.get("fused") is not None and fused_sizes is not None:
        return tuple(fused_sizes)
    return tuple(out_features(module._modules[n]) for n in names)  # type: ignore[arg-type]


def _hooked(model: nn.Module) -> list[str]:
    """Names of the modules with forward hooks."""
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs or m._forward_pre_hooks_with_kwargs
    ]


# Module names (last part) whose hooks are a tensor-parallel plan's (tp_ollama.parallel.plans): the
# row-parallel projections' all-reduce, which the step makes through the decoder's callback, and the
# vocabulary-range embedding, which stays torch's.
TP_HOOKED = ("embed_tokens", "o_proj", "down_proj")


class NativeDecoder:
    """The model's layers described for `tpo_decode`: weight pointers taken once (the decoder keeps
    every tensor it points into alive), cache pointers taken once per KV cache."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL, comm: Any = None) -> None:
        cfg: Any = model.config
        body: Any = model.model
        # The embedding and final norm, not the model: the model holds this decoder, and a cycle
        # would keep every weight alive after the model is dropped until the cycle collector runs.
        self._embedding: nn.Module = body.embed_tokens
        self._final: nn.Module = body.norm
        self.gemma = cfg.family == "gemma3"
        self.dtype: torch.dtype = activation_like(model).dtype
        self._keep: list[torch.Tensor] = []
        self._fn, self._paged = lib.tpo_decode, lib.tpo_decode_paged
        # A pipeline stage runs its own layers; the hand-overs between stages are the stage's.
        self.stage: Any = model.__dict__.get("pipeline")
        self.index = list(self.stage.layers) if self.stage is not None else list(range(len(body.layers)))
        self.n_pool_layers = len(body.layers)
        layers = [body.layers[i] for i in self.index]
        attn0 = layers[0].self_attn
        hd = attn0.head_dim
        q_size, k_size, _ = _sizes(attn0, QKV)
        self.hidden = int(cfg.hidden_size)
        self.layers = (TpoLayer * len(layers))()
        self.windows = [block.self_attn.window or 0 for block in layers]
        for i, block in enumerate(layers):
            self._describe(block, self.layers[i], body)
        self.decoder = TpoDecoder(
            n_layers=len(layers),
            hidden=self.hidden,
            n_q=q_size // hd,
            n_kv=k_size // hd,
            head_dim=hd,
            intermediate=_sizes(layers[0].mlp, GATE_UP)[0],
            eps=float(layers[0].input_layernorm.eps),
            attn_scale=float(attn0.scale),
            bf16=int(self.dtype == torch.bfloat16),
            norm_unit_offset=int(self.gemma),
            gelu=int(self.gemma),
            layers=self.layers,
        )
        kv_map = attn0.kv_map
        if kv_map is not None and not _grouped(kv_map, q_size // hd, k_size // hd):
            first = torch.searchsorted(kv_map.cpu().contiguous(), torch.arange(k_size // hd + 1), right=False)
            self._keep.append(first)
            self.decoder.kv_first = first.data_ptr()
        self._cache: Any = None
        self._embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=self.dtype) if self.gemma else None
        self._logits_fn, self._paged_logits = lib.tpo_decode_logits, lib.tpo_decode_paged_logits
        self.vocab = 0
        self.comm = comm
        self._reduce_error: BaseException | None = None
        self._native_reduce: Any = None
        if comm is not None and comm.world_size > 1:
            # A shard (of the whole model, or of a pipeline stage: `comm` is then the stage's): the
            # embedding (a vocabulary range, assembled by its hooks) and the LM head (this rank's
            # logits) stay torch's; the layers sum o's and down's outputs through the group's
            # native all-reduce where it has one (shared memory), else through a Python callback.
            finder = getattr(comm, "native_all_reduce", None)
            self._native_reduce = finder() if finder is not None else None
            if self._native_reduce is not None:
                self.decoder.all_reduce = self._native_reduce.fn
                self.decoder.reduce_ctx = self._native_reduce.ctx
            else:
                self._reduce = REDUCE_FN(self._all_reduce)
                self.decoder.all_reduce = ctypes.cast(self._reduce, ctypes.c_void_p)
            self.takes_tokens = False
        elif self.stage is not None:
            self.takes_tokens = False  # the stages' modules embed and project
        else:
            self.takes_tokens = self._describe_ends(model)

    def _all_reduce(self, ctx: int | None, ptr: int, n: int) -> int:
        """The step's callback: sum n floats at ptr over the group, in place; 1 on failure (kept for
        the caller to raise once the step has returned)."""
        try:
            view = torch.frombuffer((ctypes.c_float * n).from_address(ptr), dtype=torch.float32)
            out = self.comm.all_reduce(view)
            if out.data_ptr() != view.data_ptr():
                view.copy_(out)
            return 0
        except BaseException as e:  # ctypes cannot carry an exception through C
            self._reduce_error = e
            return 1

    def _settle(self) -> None:
        """Count the native all-reduces of the last step where the communicator counts its own."""
        calls, seconds = self._native_reduce.settle()
        self.comm.stats["all_reduce"] += calls
        if hasattr(self.comm, "seconds"):
            self.comm.seconds += seconds

    def _check(self, rc: int, what: str, expected: str) -> None:
        if self._native_reduce is not None:
            self._settle()
        if rc == 0:
            return
        if rc == -3 and self._native_reduce is not None:
            raise self._native_reduce.error()
        if rc == -3 and self._reduce_error is not None:
            error, self._reduce_error = self._reduce_error, None
            raise error
        raise _failure(rc, what, expected)

    def _describe_ends(self, model: nn.Module) -> bool:
        """Describe the embedding, final norm and LM head for the logits functions; False where one of
        them is not what they read (then the model's own modules embed and project)."""
        cfg: Any = model.config
        body: Any = model.model
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            return False
        emb = body.embed_tokens
        head_module = getattr(model, "lm_head", None)
        d = self.decoder
        if isinstance(emb, QuantEmbedding):
            w = emb.qweight
            if emb.dtype != self.dtype or _native_weight(w) is None:
                return False
            d.embed_kind, d.embed = EMBED_QUANT, self._quantized(w)
            head = w if head_module is None else _weight(head_module)
        elif isinstance(emb, nn.Embedding) and emb.weight.dtype == self.dtype and emb.weight.is_contiguous():
            table = emb.weight.detach()
            self._keep.append(table)
            kind = EMBED_BF16 if self.dtype == torch.bfloat16 else EMBED_F32
            n, k = table.shape
            d.embed_kind, d.embed = kind, TpoLinear(packed=table.data_ptr(), n=n, k=k)
            head = None if head_module is None else _weight(head_module)
        else:
            return False
        if head is None or (head_module is not None and head_module.bias is not None):
            return False
        d.head = self._quantized(head)
        d.embed_scale = float(self._embed_scale) if self._embed_scale is not None else 0.0
        d.final_norm = self._norm(body.norm)
        self.vocab = int(d.head.n)
        return True

    def _vector(self, t: torch.Tensor | None, offset: bool = False) -> int | None:
        """A float32 copy of a norm scale (1 + w for Gemma) or bias, in the activation dtype's values."""
        if t is None:
            return None
        v = t.detach().float()
        v = (1.0 + v) if offset else v.to(self.dtype).float()
        v = v.contiguous()
        self._keep.append(v)
        return v.data_ptr()

    def _linear(self, module: nn.Module | None) -> TpoLinear:
        if module is None:
            return TpoLinear(n=0)
        w = _weight(module)
        assert w is not None
        return self._quantized(w, self._vector(module.bias))  # type: ignore[arg-type]

    def _quantized(self, w: QuantWeight, bias: int | None = None) -> TpoLinear:
        if isinstance(w, Int8Weight):
            self._keep += [w.q, w.scale]
            n, k = w.shape
            return TpoLinear(
                int8=1,
                packed=w.q.data_ptr(),
                scale_zero=w.scale.data_ptr(),
                ld_sz=k // w.group,
                n=n,
                k=k,
                group=w.group,
                bias=bias,
            )
        self._keep += [w.packed, w.scale_zero]
        n, k = w.shape
        return TpoLinear(
            packed=w.packed.data_ptr(),
            scale_zero=w.scale_zero.data_ptr(),
            ld_sz=w.scale_zero.stride(0) // 2,
            n=n,
            k=k,
            group=w.group,
            bias=bias,
        )

    def _norm(self, norm: nn.Module | None) -> int | None:
        return None if norm is None else self._vector(norm.weight, offset=self.gemma)  # type: ignore[arg-type]

    def _describe(self, block: Any, out: TpoLayer, body: Any) -> None:
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = _parts(attn, QKV) or [], _parts(mlp, GATE_UP) or []
        out.q, out.k, out.v = (self._linear(m) for m in [*qkv, None, None][:3])
        out.gate, out.up = (self._linear(m) for m in [*gate_up, None][:2])
        out.o = self._linear(attn.o_proj)
        out.down = self._linear(mlp.down_proj)
        out.input_norm = self._norm(block.input_layernorm)
        if self.gemma:
            out.pre_ffn_norm = self._norm(block.pre_feedforward_layernorm)
            out.post_attn_norm = self._norm(block.post_attention_layernorm)
            out.post_ffn_norm = self._norm(block.post_feedforward_layernorm)
            rotary = body.rotary_sliding if attn.window is not None else body.rotary_full
        else:
            out.pre_ffn_norm = self._norm(block.post_attention_layernorm)
            rotary = body.rotary
        out.q_norm = self._norm(attn.q_norm)
        out.k_norm = self._norm(attn.k_norm)
        inv_freq = rotary.inv_freq.float().contiguous()
        self._keep.append(inv_freq)
        out.inv_freq = inv_freq.data_ptr()

    def _bind(self, cache: Any) -> None:
        """Point the layers at this cache's tensors (a new cache comes with each generation)."""
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            layer.k_cache, layer.v_cache = kv.k.data_ptr(), kv.v.data_ptr()
            layer.cache_pos, layer.capacity, layer.window = kv.pos.data_ptr(), kv.capacity, 0
        self._cache = cache

    def fits(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> bool:
        """One token of one sequence on a contiguous cache of this model's dtype that holds exactly
        positions 0..pos-1 (the step attends over the first min(pos + 1, capacity) slots)."""
        if ids.shape != (1, 1) or ids.device.type != "cpu":
            return False
        return self.fits_at(int(positions[0, 0]), cache)

    def fits_at(self, pos: int, cache: Any) -> bool:
        """`fits` for one token at position `pos` (plain ints: what generation's loop has at hand)."""
        if self.stage is not None:  # a stage decodes over the paged pool only (decode_paged)
            return False
        if not hasattr(cache, "layers") or any(kv.used != min(pos, kv.capacity) for kv in cache.layers):
            return False
        return cache is self._cache or all(
            kv.k.dtype == self.dtype and kv.k.device.type == "cpu" and kv.k.shape[0] == 1 and kv.k.is_contiguous()
            and kv.v.is_contiguous()
            for kv in cache.layers
        )  # fmt: skip

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """As model.hidden_states for one token where `fits`: (1, 1) ids and positions -> (1, 1, hidden)."""
        pos = int(positions[0, 0])
        if cache is not self._cache:
            self._bind(cache)
        x = self._embed(ids)
        rc = self._fn(ctypes.byref(self.decoder), x.data_ptr(), pos, torch.get_num_threads())
        self._check(rc, f"position {pos}", "shapes it takes")
        for kv in cache.layers:
            kv.used = max(kv.used, pos % kv.capacity + 1)
        return self._final_norm(x)

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The next token's logits (vocab,) float32 where `fits` and `takes_tokens`: as
        model.logits(hidden_states(...)[:, -1]).float()[0], the embedding and head in the same call."""
        return self.step(int(ids[0, 0]), int(positions[0, 0]), cache)

    def step(self, token: int, pos: int, cache: Any) -> torch.Tensor:
        """`logits` for token id `token` at position `pos` where `fits_at` and `takes_tokens`."""
        if not self.takes_tokens:
            raise RuntimeError("this model's embedding or LM head is not one the native step reads")
        if cache is not self._cache:
            self._bind(cache)
        out = torch.empty(self.vocab, dtype=torch.float32)
        rc = self._logits_fn(ctypes.byref(self.decoder), token, pos, out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise _failure(rc, f"token {token} at position {pos}", self._vocabulary())
        for kv in cache.layers:
            kv.used = max(kv.used, pos % kv.capacity + 1)
        return out

    def fits_pool(self, pool: Any) -> bool:
        """Whether the step reads this paged KV pool (tp_ollama.engine.paged_kv.BlockPool)."""
        if pool is self._cache:
            return True
        return len(pool.k) == self.n_pool_layers and all(
            pool.k[i].dtype == self.dtype and pool.k[i].device.type == "cpu" and pool.k[i].is_contiguous()
            and pool.v[i].is_contiguous()
            for i in self.index
        )  # fmt: skip

    def decode_paged(
        self, ids: torch.Tensor, positions: list[int], seqs: list[Any], pool: Any, logits: bool = False
    ) -> torch.Tensor:
        """As model.hidden_states over a PagedBatchCache for one new token of each sequence where
        `fits_pool`: ids (B, 1) at `positions` (each past its sequence's committed ones, reserved)
        -> (B, 1, hidden); with `logits` (where `takes_tokens`) the (B, vocab) float32 logits instead,
        as model.logits(...).float(). Keys and values go to the sequences' blocks; committing them is
        the caller's."""
        for seq, p in zip(seqs, positions, strict=True):
            if not seq.length <= p < seq.capacity:
                raise ValueError(f"cannot write position {p}: {seq.length} are committed and {seq.capacity} reserved")
        if pool is not self._cache:
            for layer, i, window in zip(self.layers, self.index, self.windows, strict=True):
                layer.k_cache, layer.v_cache, layer.window = pool.k[i].data_ptr(), pool.v[i].data_ptr(), window
            self._cache = pool
        widest = max(len(seq.table) for seq in seqs)
        tables = torch.tensor([seq.table + [0] * (widest - len(seq.table)) for seq in seqs], dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        batch = (len(seqs), pos.data_ptr(), tables.data_ptr(), widest, pool.block_size)
        decoder, threads = ctypes.byref(self.decoder), torch.get_num_threads()
        if logits:
            if not self.takes_tokens:
                raise RuntimeError("this model's embedding or LM head is not one the native step reads")
            tokens = ids.reshape(-1).to(torch.int64).contiguous()
            out = torch.empty(len(seqs), self.vocab, dtype=torch.float32)
            rc = self._paged_logits(decoder, tokens.data_ptr(), *batch, out.data_ptr(), threads)
            if rc != 0:
                raise _failure(rc, f"tokens {tokens.tolist()} at positions {positions}", self._vocabulary())
            return out

        def layers(x: torch.Tensor) -> torch.Tensor:
            x = x.contiguous()
            rc = self._paged(decoder, x.data_ptr(), *batch, threads)
            self._check(rc, f"positions {positions}", "shapes it takes")
            return x

        if self.stage is not None:
            x = self.stage.run(lambda: self._embed(ids), layers, (len(seqs), 1, self.hidden), ids.device)
            return self._final_norm(x) if self.stage.last else x
        return self._final_norm(layers(self._embed(ids)))

    def _vocabulary(self) -> str:
        return f"token ids in 0..{self.vocab - 1}"

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._final(x.to(self.dtype))
        return out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 1) ids -> (B, 1, hidden) float32 rows in the activation dtype's values, as the model
        embeds them (Gemma scales by sqrt(hidden) in that dtype)."""
        x = self._embedding(ids)
        if self._embed_scale is not None:
            x = x * self._embed_scale
        return x.float().contiguous()


def _failure(rc: int, what: str, expected: str) -> Exception:
    """The error of a native step that returned rc: -2 out of memory, else it refused `what`."""
    if rc == -2:
        return MemoryError(f"the native decode step ran out of memory at {what}")
    return ValueError(f"the native decode step refused {what}: it takes {expected}")


def native_decoder(model: nn.Module) -> NativeDecoder | None:
    """The model's native decoder, made on first use; None where the native step does not apply."""
    if "_native_decoder" not in model.__dict__:
        model.__dict__["_native_decoder"], model.__dict__["_native_why_not"] = _make(model)
    decoder: NativeDecoder | None = model.__dict__["_native_decoder"]
    return decoder


def why_not_native(model: nn.Module) -> str | None:
    """Why decode steps of this model take the torch modules instead of the native step; None when
    they take the native step."""
    native_decoder(model)
    why: str | None = model.__dict__["_native_why_not"]
    return why


def _make(model: nn.Module) -> tuple[NativeDecoder | None, str | None]:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None, f"{ENV_SWITCH}=0"
    lib = native.library()
    if lib is None:
        return None, "the native kernels are not available on this machine"
    if library_layout(lib) != binding_layout():
        return None, "the native library's structs do not match tp_ollama/models/native_decode.py's"
    cfg: Any = getattr(model, "config", None)
    body: Any = getattr(model, "model", None)
    if cfg is None or body is None or cfg.family not in ("gemma3", "llama", "mistral", "qwen2", "qwen3"):
        return None, f"the native step has no recipe for the {getattr(cfg, 'family', '?')} family"
    like = activation_like(model)
    dtype = like.dtype
    if dtype not in (torch.bfloat16, torch.float32) or like.device.type != "cpu":
        return None, f"activations in {dtype} on {like.device} (it takes float32 or bfloat16 on the CPU)"
    stage = model.__dict__.get("pipeline")
    comm = model.__dict__.get("tp_comm")
    sharded = comm is not None and comm.world_size > 1
    foreign = [n for n in _hooked(model) if not (sharded and n.rsplit(".", 1)[-1] in TP_HOOKED)]
    if foreign:
        return None, f"modules with forward hooks it would skip: {', '.join(foreign[:3])}"
    shapes = set()
    for i in stage.layers if stage is not None else range(len(body.layers)):
        block = body.layers[i]
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = _parts(attn, QKV), _parts(mlp, GATE_UP)
        if qkv is None or gate_up is None:
            return None, f"layer {i} has no q/k/v or gate/up projections it knows"
        if any(_weight(m) is None for m in [*qkv, *gate_up, attn.o_proj, mlp.down_proj]):
            return None, f"layer {i} has a linear layer in float or in a layout the native kernels do not read"
        q, k, v = _sizes(attn, QKV)
        gate, up = _sizes(mlp, GATE_UP)
        hd = attn.head_dim
        uneven = attn.kv_map is not None and not _grouped(attn.kv_map, q // hd, k // hd)
        if hd > 1024 or hd % 32 or q % hd or k % hd or k != v or k == 0 or (q % k and not uneven) or gate != up:
            return None, f"layer {i}'s shapes (q {q}, k {k}, v {v}, head_dim {hd}, gate {gate}, up {up})"
        if attn.kv_map is not None and not _in_order(attn.kv_map, k // hd):
            return None, f"layer {i}'s query heads read their KV heads out of order ({attn.kv_map.tolist()})"
        norms = [block.input_layernorm, attn.q_norm, attn.k_norm]
        if any(n is not None and n.weight.dtype != dtype for n in norms):
            return None, f"layer {i} has norms in another dtype than its activations"
        shapes.add((q, k, gate, hd))
    if len(shapes) != 1:  # the step takes one set of head counts and sizes for every layer
        return None, "its layers differ in head counts or sizes"
    return NativeDecoder(model, lib, comm if sharded else None), None


def _in_order(kv_map: torch.Tensor, n_kv: int) -> bool:
    """Whether each KV head is read by a run of consecutive query heads, in KV head order (what a
    tensor-parallel layout gives: a rank's KV heads are the ones its query heads read)."""
    m = kv_map.cpu()
    return bool(len(m) > 0 and m[0] == 0 and m[-1] == n_kv - 1 and ((m[1:] - m[:-1]) >= 0).all()
                and ((m[1:] - m[:-1]) <= 1).all())  # fmt: skip


def _grouped(kv_map: torch.Tensor, n_q: int, n_kv: int) -> bool:
    """Whether query head h reads KV head h // (n_q // n_kv), as the native attention does."""
    return n_q % n_kv == 0 and torch.equal(kv_map.cpu(), torch.arange(n_q) // (n_q // n_kv))
