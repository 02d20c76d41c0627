"""The ranks of a one-shot `generate --tp N` (tp_ollama.oneshot starts them). Every worker joins the
group, loads its shard, then steps the engine's loop in lockstep (engine/direct.py), rank 0 deciding
every step. Rank 0 also owns the text side (tokenizer, prompt, stop strings, output); the other ranks
see token ids only."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tp_ollama.client.format import stats as verbose_stats
from tp_ollama.completion import final_metrics
from tp_ollama.engine.direct import DirectEngine, GenerationStats
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.state import EngineJob
from tp_ollama.errors import TpOllamaError
from tp_ollama.launch import REPORTED_EXIT
from tp_ollama.logs import setup_logging
from tp_ollama.parallel.comm import Comm, join_group
from tp_ollama.store.embedded import resolve_model
from tp_ollama.text.process import TextProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerJob:
    """Everything a rank needs, passed through torchrun's launcher (must pickle)."""

    model: str
    dtype: str = "auto"
    quant: str = "auto"
    tp_weights: tuple[float, ...] | None = None
    pp: int = 1  # pipeline stages; the ranks are tp x pp
    pp_weights: tuple[float, ...] | None = None
    strategy: str = "tensor"  # "auto": the cost model picks tensor, layer-wise or hybrid at load
    memory_budget: int = 0  # the most weight bytes a rank may hold (0: no limit)
    comm: str = "auto"
    device: str = "cpu"  # "cpu" or "cuda[:FIRST]" (see rank_device)
    timeout_s: float = 120.0
    prompt: str = ""
    chat: bool = False
    system: str | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    debug: bool = False
    verbose: bool = False


def worker_main(job: WorkerJob) -> None:
    """torchrun entry point for one rank."""
    setup_logging(debug=job.debug)
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
    t0 = time.perf_counter()
    path = resolve_model(job.model)
    # Rank 0's text side (tokenizer, prompt, output) in a helper process started first: the
    # tokenizer's load (~1 s for a 262k vocabulary) overlaps the group's forming and the model's.
    first = int(os.environ.get("RANK", "0")) == 0
    text = TextProcess(path, job.prompt, job.chat, job.system, job.options.stop) if first else None
    try:
        comm = join_group(job.comm, job.timeout_s)
        try:
            _generate(job, comm, path, text, t0)
        finally:
            comm.close()
    finally:
        if text is not None:
            text.close()


def _generate(job: WorkerJob, comm: Comm, path: Path, text: TextProcess | None, t0: float) -> None:
    engine = DirectEngine(EngineJob(comm=job.comm, device=job.device, tp_weights=job.tp_weights,
                                    timeout_s=job.timeout_s, kv_cache_bytes=None, pp=job.pp,
                                    pp_weights=job.pp_weights, strategy=job.strategy,
                                    memory_budget=job.memory_budget), comm)  # fmt: skip
    engine.load(str(path), job.dtype, job.options.num_ctx, job.quant)
    load_s = time.perf_counter() - t0
    if text is None:
        engine.follow()  # rank 0 drives every step and ends the loop
        return
    try:
        ids, eos_ids = text.prompt()
        stats = GenerationStats()
        if text.print_tokens(engine.generate(ids, job.options, eos_ids, stats=stats)):
            stats.done_reason = "stop"
    finally:
        engine.close()
    if job.verbose:
        sys.stderr.write("\n" + verbose_stats(final_metrics(stats, load_s, time.perf_counter() - t0)) + "\n")
