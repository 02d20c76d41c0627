"""What every rank of an engine group keeps between steps, and the commands that change it.

Every rank holds the same `EngineState` and runs the same control commands in the same order (the
loop in engine/loop.py sees to that); rank 0 also admits requests and plans each step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tp_ollama.checkpoints.quantize import describe_precision, precision_line
from tp_ollama.engine.batch import Batch, Planner, generation_limit
from tp_ollama.engine.constraint import (
    Constraint,
    Grammar,
    GrammarVocabulary,
    LocalConstraint,
    ShardedConstraint,
    vocabulary_for,
)
from tp_ollama.engine.embed import embed_batch
from tp_ollama.engine.model_files import FilesFrom, ModelFiles, keep_copies, locate
from tp_ollama.engine.options import check_prompt
from tp_ollama.engine.paged_kv import BlockPool
from tp_ollama.engine.protocol import (
    WEIGHT_FACTS,
    ClusterFacts,
    Embed,
    Embedded,
    Generate,
    Load,
    LoadInfo,
    RankFacts,
    Request,
    decode_facts,
    encode,
)
from tp_ollama.engine.sampler import Sampler
from tp_ollama.engine.sharded_sampling import PipelineSampler, ShardedSampler
from tp_ollama.errors import TpOllamaError
from tp_ollama.kernels.linear import model_bytes
from tp_ollama.models.native_decode import why_not_native
from tp_ollama.parallel.comm import Comm, stage_group
from tp_ollama.parallel.facts import rank_facts
from tp_ollama.parallel.layout import TPLayout
from tp_ollama.parallel.pipeline import Stage, stage_of
from tp_ollama.parallel.preflight import link_preflight, measure_stage_weights
from tp_ollama.parallel.shard import load_shard, rank_device

log = logging.getLogger(__name__)

DEFAULT_KV_BYTES = 2 << 30


@dataclass(frozen=True)
class EngineJob:
    """How an engine group runs, the same on every rank."""

    socket_path: str = ""  # where rank 0 listens for the front end ("" for a driver in-process)
    comm: str = "auto"
    device: str = "cpu"
    tp_weights: tuple[float, ...] | None = None
    timeout_s: float = 120.0
    max_running: int = 16  # sequences decoding together
    # KV pool reserved per rank (committed as used, on the CPU); None sizes it for one sequence of the
    # loaded num_ctx (a one-shot generate).
    kv_cache_bytes: int | None = DEFAULT_KV_BYTES
    prefix_cache: bool = True
    # A rank of a node other than node 0: where node 0's model files are, and this node's stores.
    files_from: FilesFrom | None = None
    pp: int = 1  # pipeline stages (tp_ollama.parallel.pipeline); the group's ranks are tp x pp
    pp_weights: tuple[float, ...] | None = None
    # "auto": the cost model picks tensor, layer-wise or hybrid at each load, over the link measured then.
    strategy: str = "tensor"
    memory_budget: int = 0  # the most weight bytes this rank may hold (0: no limit)


WEIGHT_SOURCES = ("store", "node 0", "cache")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


class EngineState:
    """The loaded shard, its KV pool and the running batch; on rank 0 also the planner and the
    grammars of structured requests."""

    def __init__(self, job: EngineJob, comm: Comm) -> None:
        self.job, self.comm = job, comm
        self.model: nn.Module | None = None
        self.layout: TPLayout | None = None
        self.loaded: LoadInfo | None = None
        self.batch: Batch | None = None
        self.planner: Planner | None = None
        self.vocabulary: GrammarVocabulary | None = None  # rank 0, built on the first structured request
        self.grammars: dict[str, Grammar] = {}  # rank 0
        self.files: ModelFiles | None = None  # where the loaded model's bytes came from
        self.load_seconds = 0.0
        self.stage_comm: Any = None  # hybrid: this rank's stage's TP communicator

    # --- control commands (every rank) -----------------------------------------------------------

    def load(self, cmd: Load) -> LoadInfo:
        loaded = self.loaded
        if loaded is not None and (loaded.path, loaded.dtype, loaded.num_ctx, loaded.quant) == (
            cmd.path,
            cmd.dtype,
            cmd.num_ctx,
            cmd.quant,
        ):
            return loaded
        self.unload()
        t0 = time.perf_counter()
        job = self.job
        files = locate(cmd, job.files_from)
        pp = self._stages(files, cmd)
        tp = self.comm.world_size // pp
        if pp > 1 and tp > 1:  # hybrid: TP among each stage's ranks, over a communicator of their own
            self.stage_comm = stage_group(self.comm, job.comm, tp, job.timeout_s)
        pp_weights = job.pp_weights if pp == job.pp else None
        if pp > 1 and pp_weights is None:  # nodes of different speeds: the faster ones take more layers
            pp_weights = measure_stage_weights(self.comm, pp)
            if pp_weights is not None and self.comm.rank == 0:
                log.warning("stage weights measured (read bandwidth per stage): %s", ",".join(map(str, pp_weights)))
        model, layout, ckpt = load_shard(
            files.path, self.comm, cmd.dtype, job.device, job.tp_weights, cmd.quant, files.hook, files.identity,
            pp, pp_weights, self.stage_comm, not job.memory_budget,
        )  # fmt: skip
        del ckpt
        files.flush()
        self._check_budget(model)
        self.load_seconds = time.perf_counter() - t0  # this rank's own reading and packing
        if job.files_from is not None and job.files_from.keep_copy and files.partials and local_rank() == 0:
            keep_copies(files, cmd, job.files_from)
        self.files = files
        return self.attach(model, layout, cmd, t0)

    def _describe(self) -> list[dict[str, object]]:
        """Each rank's share: its heads and rows (tensor parallel), or its stage's layers (pipeline)."""
        assert self.layout is not None and self.model is not None
        stage = stage_of(self.model)
        if stage is None:
            return list(self.layout.describe())
        tp = self.layout.world_size
        heads = self.layout.describe()  # the TP split inside every stage alike
        return [{**(heads[r % tp] if tp > 1 else {"weight": 1.0}), "rank": r, **stage.layout.describe(r // tp)}
                for r in range(self.comm.world_size)]  # fmt: skip

    def _check_budget(self, model: nn.Module) -> None:
        """A part bigger than inference.partitioning.memory_budget fails the load on every rank together
        (one all-gather of each rank's bytes), saying how much the biggest is and what would split it
        further."""
        budget = self.job.memory_budget
        if not budget:
            return
        held = self.comm.all_gather(torch.tensor([model_bytes(model)], dtype=torch.int64)).reshape(-1)
        biggest = int(held.argmax())
        if int(held[biggest]) > budget:
            who = "this rank's part" if biggest == self.comm.rank else f"rank {biggest}'s part"
            raise TpOllamaError(
                f"{who} of the model holds {int(held[biggest]) / 1e6:.1f} MB of weights, more than "
                f"inference.partitioning.memory_budget = {budget / 1e6:.1f} MB: split it over more ranks "
                f"(--tp or --pp) or raise the budget"
            )

    def _stages(self, files: ModelFiles, cmd: Load) -> int:
        """The load's pipeline stages: as configured, or the cost model's choice (strategy auto)."""
        job, comm = self.job, self.comm
        if job.strategy != "auto" or job.pp > 1 or comm.world_size == 1:
            return job.pp
        from tp_ollama.checkpoints.loader import open_checkpoint, resolve_dtype
        from tp_ollama.checkpoints.quantize import auto_packings
        from tp_ollama.parallel.preflight import choose_partitioning, measure_link

        measured = measure_link(comm)  # first: reading a checkpoint's metadata leaves garbage to collect
        ckpt = open_checkpoint(files.path, files.hook, files.identity)
        dtype = str(resolve_dtype(cmd.dtype, rank_device(job.device), ckpt, cmd.quant)).removeprefix("torch.")
        quant = auto_packings(ckpt) if cmd.quant == "auto" else cmd.quant
        pp, line = choose_partitioning(comm, ckpt.config, quant, dtype, job.memory_budget, measured)
        if line:
            log.warning("%s", line)
        return pp

    def _weights_from(self) -> list[dict[str, object]]:
        """Per rank: where its weights were read (this node's store, bytes from node 0, or its cache),
        bytes received for this load, and bytes of partial files on its node's disk."""
        files, source = self.files, self.job.files_from
        node = source.node_rank if source is not None else 0
        ms = int(self.load_seconds * 1000)
        mine = [node, 0, 0, 0, ms, 0]
        if files is not None:
            mine = [node, WEIGHT_SOURCES.index(files.source), files.received, files.cached, ms,
                    int(files.fetch_seconds * 1000)]  # fmt: skip
        rows = self.comm.all_gather(torch.tensor(mine, dtype=torch.int64)).tolist()
        return [
            dict(zip(WEIGHT_FACTS, (int(n), WEIGHT_SOURCES[int(s)], int(r), int(c), m / 1000, f / 1000), strict=True))
            for n, s, r, c, m, f in rows
        ]

    def attach(self, model: nn.Module, layout: TPLayout, cmd: Load, t0: float | None = None) -> LoadInfo:
        """Serve `model` (this rank's shard, as `cmd` describes it): its KV pool, batch and planner."""
        t0 = time.perf_counter() if t0 is None else t0
        job, comm = self.job, self.comm
        pool = BlockPool.for_model(model, job.kv_cache_bytes, prefix_cache=job.prefix_cache, tokens=cmd.num_ctx)
        # Block ids are shared by every rank's plan: each rank's pool must have as many as the smallest.
        fewest = int(comm.all_gather(torch.tensor([pool.num_blocks], dtype=torch.int64)).min())
        if fewest < pool.num_blocks:
            pool = BlockPool.for_model(model, fewest * pool.bytes_per_block(), prefix_cache=job.prefix_cache)
        # The reservation is the bound; what the ranks commit follows the load's need, num_ctx for
        # each sequence that may run at once, and the prefix cache lives within that.
        pool.soft_blocks = min(pool.num_blocks, pool.blocks_for(cmd.num_ctx) * job.max_running)
        self.model, self.layout = model, layout
        self.batch = Batch(model, pool, sampler_for(layout, comm, stage_of(model)), self._constraint, comm)
        if comm.rank == 0:
            self.planner = Planner(pool, job.max_running)
        precision = describe_precision(model)
        why_not = why_not_native(model)
        # Which implementation decode steps take: a model the native step cannot run is said here.
        precision["decode"] = "native" if why_not is None else f"torch modules: {why_not}"
        warning = link_preflight(comm, model) if stage_of(model) is None else None
        if warning is not None:
            log.warning("%s", warning)
        world = comm.world_size
        weights_from = self._weights_from()
        self.loaded = LoadInfo(
            path=cmd.path,
            dtype=cmd.dtype,
            num_ctx=cmd.num_ctx,
            quant=cmd.quant,
            world_size=world,
            layout=[{**entry, "device": job.device, **weights_from[i]} for i, entry in enumerate(self._describe())],
            size_bytes=model_bytes(model) * world,
            precision=precision,
            load_seconds=time.perf_counter() - t0,
            kv_blocks=pool.num_blocks,
            kv_block_size=pool.block_size,
        )
        if comm.rank == 0:
            heads = "/".join(str(b - a) for a, b in layout.q_heads)
            stage = stage_of(model)
            split = f"TP {layout.world_size}"
            if stage is not None:
                split = f"{stage.layout.stages} stages (layers {stage.layout.layers}) of {split}"
            log.info(
                "loaded %s: %s (query heads %s), %s, decode: %s; KV cache %d blocks of %d tokens, "
                "up to %.0f MiB per rank, committed as used; %.2f s",
                cmd.path,
                split,
                heads,
                precision_line(precision),
                precision["decode"],
                pool.num_blocks,
                pool.block_size,
                pool.num_blocks * pool.bytes_per_block() / 2**20,
                self.loaded.load_seconds,
            )
        return self.loaded

    def fit_kv(self, *sequences: int) -> None:
        """A pool sized by need (kv_cache_bytes None) grows to hold sequences of these many positions
        at once. Every rank computes the same block count, so their plans stay interchangeable."""
        batch, model, layout = self.batch, self.model, self.layout
        if self.job.kv_cache_bytes is not None or batch is None or model is None or layout is None:
            return
        blocks = sum(batch.pool.blocks_for(n) for n in sequences)
        if blocks <= batch.pool.num_blocks or batch.running:
            return
        tokens = blocks * batch.pool.block_size
        pool = BlockPool.for_model(model, None, prefix_cache=self.job.prefix_cache, tokens=tokens)
        self.batch = Batch(model, pool, sampler_for(layout, self.comm, stage_of(model)), self._constraint, self.comm)
        if self.planner is not None:
            self.planner = Planner(pool, self.job.max_running)

    def unload(self) -> None:
        self.model = self.layout = self.loaded = self.batch = self.planner = self.vocabulary = None
        self.grammars.clear()
        if self.stage_comm is not None:
            self.stage_comm.close()
            self.stage_comm = None

    def embed(self, cmd: Embed) -> Embedded:
        if self.model is None:
            raise TpOllamaError("no model is loaded")
        vectors = embed_batch(self.model, cmd.inputs)
        stage = stage_of(self.model)
        if stage is not None:  # the last stage has the final hidden states
            vectors = self.comm.broadcast(vectors.contiguous(), src=stage.sources[-1])
        return Embedded(cmd.id, vectors.tolist() if self.comm.rank == 0 else [])

    def cluster(self, rid: str) -> ClusterFacts:
        """Every rank's facts, collected on rank 0 (one small broadcast from each rank)."""
        comm = self.comm
        mine = encode(RankFacts(rank_facts(comm.rank, rank_device(self.job.device))))
        ranks = [decode_facts(comm.broadcast_bytes(mine if r == comm.rank else None, src=r)).facts
                 for r in range(comm.world_size)]  # fmt: skip
        facts = ClusterFacts(rid, world_size=comm.world_size, ranks=ranks, as_of=time.time())
        if self.batch is not None:
            facts.kv_cache = dict(self.batch.pool.stats())
            facts.running = len(self.batch.running)
            facts.waiting = len(self.planner.waiting) if self.planner is not None else 0
        return facts

    # --- requests (rank 0) -----------------------------------------------------------------------

    def admit(self, cmd: Generate) -> Request:
        """Check a generate request and queue it; TpOllamaError (sent back to its caller) if it cannot run."""
        if self.model is None or self.planner is None or self.batch is None or self.loaded is None:
            raise TpOllamaError("no model is loaded")
        check_prompt(len(cmd.prompt), cmd.options)
        request = Request(cmd.id, list(cmd.prompt), cmd.options, cmd.eos, cmd.format is not None, list(cmd.resumed))
        if request.resumed and len(request.resumed) >= generation_limit(len(request.prompt), request.options):
            raise TpOllamaError(
                f"a resumed request has {len(request.resumed)} tokens already, all it may generate "
                f"(num_predict {request.options.num_predict}, num_ctx {request.options.num_ctx})"
            )
        blocks = self.planner.need(request)
        if blocks > self.batch.pool.num_blocks:
            raise TpOllamaError(
                f"the request needs {blocks} KV cache blocks ({request.options.num_ctx} tokens of num_ctx) "
                f"but the cache holds {self.batch.pool.num_blocks}: "
                "lower num_ctx or num_predict, or raise performance.caching.size"
            )
        if cmd.format is not None:
            if self.vocabulary is None:
                self.vocabulary = vocabulary_for(Path(self.loaded.path), self.batch.vocab)
            self.grammars[request.id] = Grammar(self.vocabulary, cmd.format.kind, cmd.format.schema)
        self.planner.waiting.append(request)
        return request

    def _constraint(self, request: Request) -> Constraint:
        grammar = self.grammars.pop(request.id, None)
        if self.comm.world_size == 1:
            assert grammar is not None
            return LocalConstraint(grammar)
        assert self.layout is not None and self.batch is not None and self.model is not None
        stage = stage_of(self.model)
        if stage is not None:  # the last stage's ranks mask their vocabulary slices, the others nothing
            span = self.layout.vocab[stage.tp_rank] if stage.last else (0, 0)
        else:
            span = self.layout.vocab[self.comm.rank]
        return ShardedConstraint(grammar, span, self.batch.vocab, self.comm)

    def busy(self) -> bool:
        return self.batch is not None and bool(self.batch.running or (self.planner and self.planner.waiting))

    def queued(self, rid: str) -> bool:
        return self.planner is not None and any(r.id == rid for r in self.planner.waiting)

    def running(self, rid: str) -> bool:
        return self.batch is not None and rid in self.batch.running

    def active_ids(self) -> list[str]:
        """Running, then queued requests."""
        running = list(self.batch.running) if self.batch is not None else []
        return running + ([r.id for r in self.planner.waiting] if self.planner is not None else [])


def sampler_for(
    layout: TPLayout, comm: Comm, stage: Stage | None = None
) -> Callable[..., Callable[[torch.Tensor, Sequence[int]], int]]:
    """The sampler factory of a batch: candidates exchanged across ranks when there are several; in a
    pipeline, the last stage's pick broadcast."""
    if comm.world_size == 1:
        return Sampler
    if stage is not None:
        return partial(PipelineSampler, stage=stage, span=layout.vocab[stage.tp_rank])
    return partial(ShardedSampler, span=layout.vocab[comm.rank], comm=comm)
