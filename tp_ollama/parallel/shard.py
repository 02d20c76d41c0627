"""A rank's part of the model: where it runs, how many threads it takes, and its shard of the
checkpoint (validated against the layout before any weight is read)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tp_ollama.checkpoints.base import Checkpoint, FileEnsure
from tp_ollama.checkpoints.loader import load_model, open_checkpoint, resolve_dtype
from tp_ollama.errors import ConfigError
from tp_ollama.parallel.comm import Comm, check_comm_kind
from tp_ollama.parallel.layout import TPLayout
from tp_ollama.store.embedded import resolve_model


def preflight(
    model: str, world_size: int, weights: tuple[float, ...] | None, comm: str, pp: int = 1,
    pp_weights: tuple[float, ...] | None = None,
) -> None:  # fmt: skip
    """Check the model, the layout and the communicator before any process starts (metadata only)."""
    check_comm_kind(comm)
    tp = check_degrees(world_size, pp)
    ckpt = open_checkpoint(resolve_model(model))
    try:
        TPLayout.build(ckpt.config, tp, weights)
        if pp > 1:
            from tp_ollama.parallel.pipeline import PipelineLayout

            PipelineLayout.build(ckpt.config, pp, pp_weights)
    finally:
        ckpt.close()


def check_degrees(world_size: int, pp: int) -> int:
    """The TP degree inside each stage of a group of `world_size` ranks in `pp` stages."""
    if pp < 1 or world_size % pp:
        raise ConfigError(f"{world_size} ranks cannot form {pp} pipeline stages: the world size is tp x pp")
    return world_size // pp


def _stage_shard(
    model: nn.Module, stages: Any, stage: int, comm: Comm, layout: TPLayout, tp_comm: Comm | None
) -> nn.Module:
    """A pipeline stage's part of the model, split by tensor parallelism among its ranks if several."""
    from tp_ollama.parallel.pipeline import apply_stage
    from tp_ollama.parallel.plans import apply_tp

    model = apply_stage(model, stages, stage, comm, layout.world_size, tp_comm)
    return apply_tp(model, layout, tp_comm) if tp_comm is not None and tp_comm.world_size > 1 else model


def rank_device(kind: str) -> torch.device:
    """cpu; or for `cuda[:FIRST]` GPU (FIRST + LOCAL_RANK) % count: a node's ranks take consecutive
    GPUs from FIRST (replicas start where the one before ended), sharing them round-robin."""
    if kind == "cuda" or kind.startswith("cuda:"):
        first = int(kind.partition(":")[2] or 0)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", (first + local) % torch.cuda.device_count())
    return torch.device(kind)


def load_shard(
    path: Path,
    comm: Comm,
    dtype: str,
    device: str = "cpu",
    weights: Sequence[float] | None = None,
    quant: str = "none",
    ensure: FileEnsure | None = None,
    identity: str | None = None,
    pp: int = 1,
    pp_weights: Sequence[float] | None = None,
    stage_comm: Comm | None = None,
    by_work: bool = True,
) -> tuple[nn.Module, TPLayout, Checkpoint]:
    """This rank's part of the model: the layout is validated from the config first, then only this
    rank's slices are read. A group of one loads the plain model, with no collectives on its path.
    `pp` > 1: the group is that many pipeline stages of world_size / pp ranks (tp_ollama.parallel.pipeline),
    this rank holding its stage's layers, split among the stage's ranks over `stage_comm` (see
    comm.stage_group) when there are several; `by_work`: see PipelineLayout.build. `ensure` and
    `identity`: see open_checkpoint. Returns (model, the TP layout inside the stage, checkpoint)."""
    ckpt = open_checkpoint(path, ensure, identity)
    tp = check_degrees(comm.world_size, pp)
    layout = TPLayout.build(ckpt.config, tp, weights)
    shard = None
    if pp > 1:
        from tp_ollama.parallel.pipeline import PipelineLayout

        stages = PipelineLayout.build(ckpt.config, pp, pp_weights, by_work)
        if tp > 1 and stage_comm is None:
            raise ValueError(f"{tp} ranks per pipeline stage need the stage's communicator (comm.stage_group)")
        shard = partial(
            _stage_shard, stages=stages, stage=comm.rank // tp, comm=comm, layout=layout, tp_comm=stage_comm
        )
    elif comm.world_size > 1:
        from tp_ollama.parallel.plans import apply_tp

        shard = partial(apply_tp, layout=layout, comm=comm)
    where = rank_device(device)
    return load_model(ckpt, resolve_dtype(dtype, where, ckpt, quant), where, shard=shard, quant=quant), layout, ckpt
