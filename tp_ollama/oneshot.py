"""The one-shot `generate`: one prompt, the generated text on stdout. In this process (the text side in a
helper process beside it), or on tensor-parallel ranks started here."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: a one-shot starts its text side before importing torch
    from tp_ollama.engine.options import GenerationOptions
    from tp_ollama.launch import Cluster


@dataclass(frozen=True)
class Prompting:
    """One generation request as the CLI received it."""

    model: str
    prompt: str
    chat: bool
    system: str | None
    options: GenerationOptions
    dtype: str
    device: str = "cpu"
    quant: str = "auto"
    verbose: bool = False  # timings on stderr afterwards, as `ollama run --verbose` prints them
    memory_budget: int = 0  # the most weight bytes a rank may hold (0: no limit)


def sampling_options(**kw: Any) -> GenerationOptions:
    from tp_ollama.engine.options import GenerationOptions, SamplingOptions

    sampling = {k: kw.pop(k) for k in list(kw) if k in SamplingOptions.__dataclass_fields__}
    kw["stop"] = tuple(kw.get("stop") or ())
    return GenerationOptions(sampling=SamplingOptions(**sampling), **kw)


def generate_in_process(req: Prompting) -> None:
    """Tokenizer and text in a helper process started first, model and tokens here: the tokenizer's
    load overlaps torch's import (see tp_ollama.text.process)."""
    from tp_ollama.store.embedded import resolve_model
    from tp_ollama.text.process import TextProcess

    t0 = time.perf_counter()
    path = resolve_model(req.model)
    text = TextProcess(path, req.prompt, req.chat, req.system, req.options.stop)
    try:
        from tp_ollama.client.format import stats as verbose_stats
        from tp_ollama.completion import final_metrics
        from tp_ollama.engine.direct import DirectEngine, GenerationStats
        from tp_ollama.engine.state import EngineJob

        engine = DirectEngine(EngineJob(device=req.device, kv_cache_bytes=None, memory_budget=req.memory_budget))
        engine.load(str(path), req.dtype, req.options.num_ctx, req.quant)
        load_s = time.perf_counter() - t0
        ids, eos_ids = text.prompt()
        stats = GenerationStats()
        if text.print_tokens(engine.generate(ids, req.options, eos_ids, stats=stats)):
            stats.done_reason = "stop"
    finally:
        text.close()
    if req.verbose:
        sys.stderr.write("\n" + verbose_stats(final_metrics(stats, load_s, time.perf_counter() - t0)) + "\n")


def generate_on_ranks(
    req: Prompting, cluster: Cluster, weights: str | None, comm: str, debug: bool, pp: int = 1,
    pp_weights: str | None = None, strategy: str = "tensor",
) -> None:  # fmt: skip
    from tp_ollama.errors import ConfigError
    from tp_ollama.launch import parse_weights, run_workers
    from tp_ollama.oneshot_ranks import WorkerJob, worker_main
    from tp_ollama.parallel.shard import preflight

    if strategy not in ("tensor", "layerwise", "hybrid", "auto"):
        raise ConfigError(f"--strategy {strategy!r} is not supported; expected tensor, layerwise, hybrid or auto")
    if strategy == "layerwise" and pp == 1:
        pp = cluster.world_size
    if strategy == "hybrid" and pp == 1:
        pp = cluster.nnodes  # a stage per node, TP among its ranks
    if strategy == "hybrid" and not 1 < pp < cluster.world_size:
        raise ConfigError(
            f"--strategy hybrid is TP inside pipeline stages, but {cluster.world_size} ranks in {pp} stages "
            "leaves one of the two out: give --pp (or several nodes, a stage each) with more ranks than stages"
        )
    preflight(req.model, cluster.world_size, parse_weights(weights), comm, pp, parse_weights(pp_weights))
    job = WorkerJob(
        strategy=strategy,
        memory_budget=req.memory_budget,
        pp=pp,
        pp_weights=parse_weights(pp_weights),
        model=req.model,
        dtype=req.dtype,
        quant=req.quant,
        device=req.device,
        tp_weights=parse_weights(weights),
        comm=comm,
        timeout_s=cluster.join_timeout_s,
        prompt=req.prompt,
        chat=req.chat,
        system=req.system,
        options=req.options,
        debug=debug,
        verbose=req.verbose,
    )
    run_workers(cluster, worker_main, job)
