"""Entry points that run inside real torchrun workers for the tensor-parallel and pipeline tests
(started by tp_ollama.launch.run_workers); each returns plain data to the test process. Also the
whole model's figures those runs are held against."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.direct import generate_ids
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.parallel.comm import init_distributed, make_comm
from tp_ollama.parallel.layout import TPLayout
from tp_ollama.parallel.plans import apply_tp
from tp_ollama.parallel.shard import rank_device

N_PROMPT = 20  # prompt tokens of the reference runs; 16 more follow one a step


def whole_model_reference(checkpoints: dict[str, Path], tokens: list[int], n_prompt: int) -> dict[str, dict]:
    """Per checkpoint, unsharded in this process: the logits at every position (one prefill, then one
    token a step), 32 greedy tokens and the parameter count."""
    out = {}
    for kind, d in checkpoints.items():
        model = load_model(open_checkpoint(d), torch.float32)
        cache = KVCache.for_model(model, batch=1, max_len=len(tokens) + 1)
        with torch.inference_mode():
            rows = [model(torch.tensor([tokens[:n_prompt]]), torch.arange(n_prompt)[None], cache)[0]]
            for i in range(n_prompt, len(tokens)):
                rows.append(model(torch.tensor([[tokens[i]]]), torch.tensor([[i]]), cache)[0])
        options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=32, num_ctx=128)
        greedy = list(generate_ids(model, tokens[:n_prompt], options, frozenset()))
        params = sum(p.numel() for p in model.parameters())
        out[kind] = {"logits": torch.cat(rows).numpy(), "greedy": greedy, "params": params}
    return out


def sharded_runs(
    dirs: list[str],
    tokens: list[int],
    n_prompt: int,
    weights: tuple[float, ...] | None,
    comm_kind: str,
    device: str = "cpu",
) -> dict[str, Any]:
    """For each checkpoint: this rank's logits at every position (one prefill, then one token a step),
    greedy tokens for 32 steps, and how many collectives one decode step used."""
    torch.set_num_threads(1)
    init_distributed("gloo", 60)
    comm = make_comm(comm_kind, 60)
    out: dict[str, Any] = {"rank": comm.rank, "pid": os.getpid()}
    for d in dirs:
        ckpt = open_checkpoint(Path(d))
        layout = TPLayout.build(ckpt.config, comm.world_size, weights)
        shard = partial(apply_tp, layout=layout, comm=comm)
        model = load_model(ckpt, torch.float32, rank_device(device), shard=shard)
        dev = next(model.parameters()).device
        cache = KVCache.for_model(model, batch=1, max_len=len(tokens) + 1)
        rows = []
        with torch.inference_mode():
            ids = torch.tensor([tokens[:n_prompt]], device=dev)
            positions = torch.arange(n_prompt, device=dev)[None]
            rows.append(model.logits(model.hidden_states(ids, positions, cache))[0])
            before = dict(comm.stats)
            for i in range(n_prompt, len(tokens)):
                h = model.hidden_states(torch.tensor([[tokens[i]]], device=dev), torch.tensor([[i]], device=dev), cache)
                rows.append(model.logits(h)[0])
                if i == n_prompt:
                    step_all_reduces = comm.stats["all_reduce"] - before.get("all_reduce", 0)
        options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=32, num_ctx=128)
        gen = generate_ids(model, tokens[:n_prompt], options, comm=comm, layout=layout)
        first = next(gen)
        before = dict(comm.stats)
        second = next(gen)
        per_step = {k: v - before.get(k, 0) for k, v in comm.stats.items() if v - before.get(k, 0)}
        greedy = [first, second, *gen]
        out[d] = {
            "span": layout.vocab[comm.rank],
            "logits": torch.cat(rows).cpu().numpy(),
            "greedy": greedy,
            "forward_all_reduces": step_all_reduces,
            "decode_step_collectives": per_step,
            "layers": len(model.model.layers),
            "params": sum(p.numel() for p in model.parameters()),
        }
    comm.close()
    return out


def native_shard_runs(path: str, dtype: str, quant: str, weights: tuple[float, ...] | None) -> dict[str, Any]:
    """On each rank: the shard's native decode step against its torch modules (hooks and all) over a
    paged batch, as tests/models/test_native_decode.py compares them on a whole model, and how many
    all-reduces one native step made."""
    from tests.models.test_native_decode import paged_both_paths
    from tests.tiny import prompt_ids
    from tp_ollama.models.native_decode import native_decoder, why_not_native

    torch.set_num_threads(1)
    init_distributed("gloo", 60)
    comm = make_comm("auto", 60)
    ckpt = open_checkpoint(Path(path))
    layout = TPLayout.build(ckpt.config, comm.world_size, weights)
    shard = partial(apply_tp, layout=layout, comm=comm)
    model = load_model(ckpt, getattr(torch, dtype), "cpu", shard=shard, quant=quant)
    out: dict[str, Any] = {"rank": comm.rank, "why_not": why_not_native(model)}
    decoder = native_decoder(model)
    if decoder is None:
        comm.close()
        return out
    prompts = [prompt_ids(n, seed=n) for n in (3, 9, 14)]
    before = comm.stats["all_reduce"]
    got, want = paged_both_paths(model, prompts, steps=6)
    out["all_reduces"] = comm.stats["all_reduce"] - before
    out["native_reduce"] = decoder._native_reduce is not None
    out["rel"] = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    out["cos"] = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    comm.close()
    return out


def host_share() -> dict[str, Any]:
    """What join_group made of this rank's host: its threads and the communicator's transport."""
    from tp_ollama.parallel.comm import join_group, ranks_on_my_host

    comm = join_group("auto", 60)
    try:
        ranks = ranks_on_my_host(comm.rank, comm.world_size, 60)
        return {"threads": torch.get_num_threads(), "transport": comm.transport, "ranks_on_host": ranks}
    finally:
        comm.close()


def host_share_node(node_rank: int, port: int) -> None:
    """One `launch`-style node of one rank (nnodes=2): prints its rank's host_share() as JSON."""
    import json

    from tp_ollama.launch import Cluster, run_workers

    results = run_workers(Cluster(nnodes=2, node_rank=node_rank, master_port=port, join_timeout_s=60), host_share)
    print(json.dumps(next(iter(results.values()))), flush=True)


if __name__ == "__main__":
    import sys

    host_share_node(int(sys.argv[1]), int(sys.argv[2]))


def pipeline_runs(
    dirs: list[str], tokens: list[int], n_prompt: int, stages: int, weights: tuple[float, ...] | None, tp: int = 1
) -> dict[str, Any]:
    """For each checkpoint, as one rank of one stage of `stages` (`tp` ranks each, TP inside the stage):
    the logits at every position (the last stage's vocabulary slice; the others have none), greedy
    tokens for 32 steps, the stage's layers, its vocabulary rows and its parameter count."""
    from tp_ollama.parallel.comm import stage_group
    from tp_ollama.parallel.pipeline import PipelineLayout
    from tp_ollama.parallel.shard import load_shard

    torch.set_num_threads(1)
    init_distributed("gloo", 60)
    comm = make_comm("gloo", 60)
    out: dict[str, Any] = {"rank": comm.rank}
    for d in dirs:
        tp_comm = stage_group(comm, "gloo", tp, 60) if tp > 1 else None
        model, tp_layout, ckpt = load_shard(Path(d), comm, "float32", pp=stages, pp_weights=weights, stage_comm=tp_comm)
        layout = PipelineLayout.build(ckpt.config, stages, weights)
        ckpt.close()
        cache = KVCache.for_model(model, batch=1, max_len=len(tokens) + 1)
        rows = []
        with torch.inference_mode():
            ids, positions = torch.tensor([tokens[:n_prompt]]), torch.arange(n_prompt)[None]
            rows.append(model.logits(model.hidden_states(ids, positions, cache))[0])
            for i in range(n_prompt, len(tokens)):
                h = model.hidden_states(torch.tensor([[tokens[i]]]), torch.tensor([[i]]), cache)
                rows.append(model.logits(h)[0])
        options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=32, num_ctx=128)
        greedy = list(generate_ids(model, tokens[:n_prompt], options, comm=comm, layout=tp_layout))
        out[d] = {
            "logits": torch.cat(rows).numpy(),
            "greedy": greedy,
            "layers": list(layout.layers[comm.rank // tp]),
            "vocab": list(tp_layout.vocab[comm.rank % tp]),
            "params": sum(p.numel() for p in model.parameters()),
        }
    comm.close()
    return out
