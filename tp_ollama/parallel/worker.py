"""What every torchrun worker runs: join the group, validate the layout, load this rank's shard,
then generate in lockstep. Rank 0 owns the text side (tokenizer, prompt, stop strings, output);
the other ranks see token ids only."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tp_ollama.completion import final_metrics, text_pieces
from tp_ollama.engine.generate import GenerationStats, generate_tokens
from tp_ollama.engine.options import GenerationOptions, SamplingOptions, check_prompt
from tp_ollama.engine.sampler import Sampler
from tp_ollama.errors import TpOllamaError
from tp_ollama.launch import REPORTED_EXIT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerJob:
    """Everything a rank needs, passed through torchrun's launcher (must pickle)."""

    model: str
    dtype: str = "float32"
    quant: str = "none"
    tp_weights: tuple[float, ...] | None = None
    comm: str = "auto"
    device: str = "cpu"  # "cpu" or "cuda[:FIRST]" (see rank_device)
    timeout_s: float = 120.0
    prompt: str = ""
    chat: bool = False
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # GenerationOptions as plain data
    debug: bool = False
    verbose: bool = False


class BroadcastLockstep:
    """Rank 0 sends 1 (go on) or 0 (stop) before every decode step; the others follow it."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.flag = torch.zeros(1, dtype=torch.int64)

    def proceed(self) -> bool:
        if self.comm.rank == 0:
            self.flag.fill_(1)
        return bool(self.comm.broadcast(self.flag, src=0)[0])

    def stop(self) -> None:
        if self.comm.rank == 0:
            self.flag.fill_(0)
            self.comm.broadcast(self.flag, src=0)


def options_to_data(options: GenerationOptions) -> dict[str, Any]:
    return asdict(options)


def options_from_data(data: dict[str, Any]) -> GenerationOptions:
    sampling = SamplingOptions(**data["sampling"])
    return GenerationOptions(
        sampling=sampling, num_predict=data["num_predict"], num_ctx=data["num_ctx"], stop=tuple(data["stop"])
    )


def local_threads(local_world: int) -> int:
    """Ranks on one host share its cores: each gets an equal part so that OpenMP threads don't spin
    against each other. OMP_NUM_THREADS, when set, wins (e.g. several "nodes" on one machine)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def preflight(model: str, world_size: int, weights: tuple[float, ...] | None, comm: str) -> None:
    """Check the model, the layout and the communicator before any process starts (metadata only)."""
    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.parallel.comm import check_comm_kind
    from tp_ollama.parallel.layout import TPLayout
    from tp_ollama.store.embedded import resolve_model

    check_comm_kind(comm)
    ckpt = open_checkpoint(resolve_model(model))
    try:
        TPLayout.build(ckpt.config, world_size, weights)
    finally:
        ckpt.close()


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
    comm: Any,
    dtype: str,
    device: str = "cpu",
    weights: Sequence[float] | None = None,
    quant: str = "none",
) -> tuple[nn.Module, Any, Any]:
    """This rank's part of the model: the layout is validated from the config first, then only this
    rank's slices are read. A group of one loads the plain model, with no collectives on its path.
    Returns (model, layout, checkpoint)."""
    from tp_ollama.checkpoints.loader import load_model, open_checkpoint, resolve_dtype
    from tp_ollama.parallel.layout import TPLayout
    from tp_ollama.parallel.plans import apply_tp

    ckpt = open_checkpoint(path)
    layout = TPLayout.build(ckpt.config, comm.world_size, weights)
    shard = None
    if comm.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (comm.world_size,))
        shard = partial(apply_tp, layout=layout, comm=comm, device_mesh=mesh)
    where = rank_device(device)
    return load_model(ckpt, resolve_dtype(dtype, where), where, shard=shard, quant=quant), layout, ckpt


def sampler_for(layout: Any, comm: Any) -> Callable[..., Any]:
    """The sampler factory for generate_tokens: candidates exchanged across ranks when there are several."""
    from tp_ollama.parallel.sampling import ShardedSampler

    if comm.world_size == 1:
        return Sampler
    return partial(ShardedSampler, span=layout.vocab[comm.rank], comm=comm)


def worker_main(job: WorkerJob) -> None:
    """torchrun entry point for one rank."""
    logging.basicConfig(level=logging.DEBUG if job.debug else logging.WARNING, stream=sys.stderr)
    rank = int(os.environ.get("RANK", "0"))
    try:
        _run(job)
    except TpOllamaError as e:
        if job.debug:
            raise
        # One line per node (ranks of a node fail alike), then an exit code that tells the
        # launcher the user has been told.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"Error: {e}" if rank == 0 else f"Error (rank {rank}): {e}", file=sys.stderr, flush=True)
        raise SystemExit(REPORTED_EXIT) from None


def _run(job: WorkerJob) -> None:
    from tp_ollama.parallel.comm import init_distributed, make_comm
    from tp_ollama.parallel.preflight import link_preflight
    from tp_ollama.store.embedded import resolve_model

    torch.set_num_threads(local_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    backend = "nccl" if job.comm == "nccl" else "gloo"
    init_distributed(backend, job.timeout_s)
    comm = make_comm(job.comm, job.timeout_s)
    rank = comm.rank
    t0 = time.perf_counter()
    path = resolve_model(job.model)
    model, layout, _ = load_shard(path, comm, job.dtype, job.device, job.tp_weights, job.quant)
    load_s = time.perf_counter() - t0
    log.info("rank %d loaded its shard %s in %.2f s", rank, layout.describe()[rank], load_s)
    warning = link_preflight(comm, model)
    if warning is not None:
        print(f"Warning: {warning}", file=sys.stderr, flush=True)

    tokenizer, request = _prepare_request(job, path) if rank == 0 else (None, None)
    data = json.loads(comm.broadcast_bytes(json.dumps(request).encode() if rank == 0 else None, src=0))
    if "error" in data:
        if rank == 0:
            raise TpOllamaError(data["error"])
        return
    options = options_from_data(data["options"])
    stats = GenerationStats()
    tokens = generate_tokens(
        model, data["ids"], options, frozenset(data["eos"]), stats, sampler_for(layout, comm), BroadcastLockstep(comm)
    )
    if tokenizer is not None:
        for piece in text_pieces(tokenizer, tokens, options.stop, stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
        if job.verbose:
            from tp_ollama.client.format import stats as verbose_stats

            sys.stderr.write("\n" + verbose_stats(final_metrics(stats, load_s, time.perf_counter() - t0)) + "\n")
    else:
        for _ in tokens:
            pass
    comm.close()


def _prepare_request(job: WorkerJob, path: Any) -> tuple[Any, dict[str, Any]]:
    """Rank 0: tokenize and validate; an error travels to the other ranks instead of the prompt."""
    from tp_ollama.text.prompt import prompt_tokens, tokenizer_at

    try:
        tokenizer = tokenizer_at(path)
        options = options_from_data(job.options)
        ids = prompt_tokens(tokenizer, job.prompt, chat=job.chat, system=job.system)
        check_prompt(len(ids), options)
    except TpOllamaError as e:
        return None, {"error": str(e)}
    return tokenizer, {"ids": ids, "eos": sorted(tokenizer.eos_ids), "options": job.options}
