"""Tensor-parallel plans: one dict per family, {module path pattern: ShardStyle}, applied from
outside the model by `apply_plan` (a `*` in a pattern matches one path component, as in torch's
parallelize_module).

The styles are our own because torch's stock ColwiseParallel/RowwiseParallel split tensors in equal
chunks, which cannot express head-aligned uneven or weighted splits, nor KV heads replicated across
ranks; and nothing here needs DTensor, whose import costs a rank ~0.6 s and ~40 MB. The styles
run on the meta-device model before any weight is read: each
sharded parameter is replaced by a meta parameter of the local shape carrying `tp_slice`
(dim, start, end) — which the loader reads from the checkpoint — and the collectives are
forward hooks on local tensors (no DTensor dispatch on the decode path).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Protocol

import torch
from torch import nn

from tp_ollama.parallel.comm import Comm
from tp_ollama.parallel.layout import Span, TPLayout


class ShardStyle(Protocol):
    """How the modules a plan pattern matches are cut for this rank."""

    def apply(self, module: Any) -> None: ...


def shard_parameter(module: Any, name: str, dim: int, span: Span) -> None:
    """Replace module.<name> by a parameter of the local shape that remembers its slice."""
    old = getattr(module, name)
    shape = list(old.shape)
    shape[dim] = span[1] - span[0]
    new = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=False)
    new.tp_slice = (dim, span[0], span[1])  # type: ignore[attr-defined]
    setattr(module, name, new)


def drop_bias_off_rank0(linear: Any, rank: int) -> None:
    """A row-parallel bias must be added once: rank 0 keeps it, the partial sums of the others don't."""
    if rank != 0 and linear.bias is not None:
        linear.bias = None


def all_reduce_output(comm: Comm) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(output.contiguous())

    return hook


class HeadParallelAttention(ShardStyle):
    """q, k, v column-parallel by whole heads, o row-parallel over the same heads, one all-reduce
    after o. A rank keeps the KV heads its query heads read (shared between ranks when needed)."""

    def __init__(self, layout: TPLayout, comm: Comm) -> None:
        self.layout, self.comm = layout, comm

    def apply(self, module: Any) -> None:
        r, hd = self.comm.rank, self.layout.head_dim
        (qa, qb), (ka, kb) = self.layout.q_heads[r], self.layout.kv_heads[r]
        q_rows, kv_rows = (qa * hd, qb * hd), (ka * hd, kb * hd)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            lin = getattr(module, proj)
            shard_parameter(lin, "weight", 0, rows)
            if lin.bias is not None:
                shard_parameter(lin, "bias", 0, rows)
        shard_parameter(module.o_proj, "weight", 1, q_rows)
        drop_bias_off_rank0(module.o_proj, r)
        group = self.layout.n_heads // self.layout.n_kv_heads
        module.kv_map = torch.tensor([h // group - ka for h in range(qa, qb)], dtype=torch.long)
        module.o_proj.register_forward_hook(all_reduce_output(self.comm))


class RowSplitMLP(ShardStyle):
    """gate and up column-parallel, down row-parallel over the same rows, one all-reduce after down."""

    def __init__(self, layout: TPLayout, comm: Comm) -> None:
        self.layout, self.comm = layout, comm

    def apply(self, module: Any) -> None:
        rows = self.layout.mlp[self.comm.rank]
        for proj in ("gate_proj", "up_proj"):
            lin = getattr(module, proj)
            shard_parameter(lin, "weight", 0, rows)
            if lin.bias is not None:
                shard_parameter(lin, "bias", 0, rows)
        shard_parameter(module.down_proj, "weight", 1, rows)
        drop_bias_off_rank0(module.down_proj, self.comm.rank)
        module.down_proj.register_forward_hook(all_reduce_output(self.comm))


class VocabParallelEmbedding(ShardStyle):
    """Each rank holds a range of vocabulary rows; ids outside it look up zeros, and one all-reduce
    assembles the embedding. With tied weights the same shard serves as this rank's LM head."""

    def __init__(self, layout: TPLayout, comm: Comm) -> None:
        self.layout, self.comm = layout, comm

    def apply(self, module: Any) -> None:
        a, b = self.layout.vocab[self.comm.rank]
        shard_parameter(module, "weight", 0, (a, b))
        comm = self.comm
        outside: dict[str, torch.Tensor] = {}

        def localize(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            ids = args[0]
            mask = (ids < a) | (ids >= b)
            outside["mask"] = mask
            return ((ids - a).masked_fill(mask, 0),)

        def assemble(mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.masked_fill(outside.pop("mask")[..., None], 0.0)  # (B, T, D)
            return comm.all_reduce(out)

        module.register_forward_pre_hook(localize)
        module.register_forward_hook(assemble)


class VocabParallelHead(ShardStyle):
    """An untied LM head split by vocabulary rows; logits stay local (the sampler exchanges only
    per-rank candidates, never a full vocabulary row)."""

    def __init__(self, layout: TPLayout, comm: Comm) -> None:
        self.layout, self.comm = layout, comm

    def apply(self, module: Any) -> None:
        shard_parameter(module, "weight", 0, self.layout.vocab[self.comm.rank])


def decoder_plan(layout: TPLayout, comm: Comm, tied: bool) -> dict[str, ShardStyle]:
    plan: dict[str, ShardStyle] = {
        "model.embed_tokens": VocabParallelEmbedding(layout, comm),
        "model.layers.*.self_attn": HeadParallelAttention(layout, comm),
        "model.layers.*.mlp": RowSplitMLP(layout, comm),
    }
    if not tied:
        plan["lm_head"] = VocabParallelHead(layout, comm)
    return plan


# One plan per family. They coincide today because every family names its modules like HF Llama;
# a family with different module names gets its own entry here.
PLANS = {
    "llama": decoder_plan,
    "mistral": decoder_plan,
    "qwen2": decoder_plan,
    "qwen3": decoder_plan,
    "gemma3_text": decoder_plan,
}


def apply_plan(model: nn.Module, plan: dict[str, ShardStyle]) -> None:
    """Apply each style to every module whose dotted path matches its pattern, component by
    component (but not to a module that another pipeline stage holds); a pattern that matches
    nothing is a plan written for other module names."""
    used: set[str] = set()
    for name, module in list(model.named_modules()):
        atoms = name.split(".")
        for pattern, style in plan.items():
            parts = pattern.split(".")
            if len(parts) == len(atoms) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(atoms, parts, strict=True)):
                if not getattr(module, "absent", False):  # another pipeline stage's (parallel/pipeline.py)
                    style.apply(module)
                used.add(pattern)
    unused = [p for p in plan if p not in used]
    if unused:
        raise ValueError(f"tensor-parallel plan patterns {unused} match no module of {type(model).__name__}")


def apply_tp(model: nn.Module, layout: TPLayout, comm: Comm) -> nn.Module:
    cfg: Any = model.config
    apply_plan(model, PLANS[cfg.model_type](layout, comm, bool(cfg.tie_word_embeddings)))
    # The native decode step (models/native_decode.py) runs the layers itself and calls this
    # communicator where the o and down hooks would (it knows which modules a plan hooks).
    model.__dict__["tp_comm"] = comm
    return model
