"""Entry points that run inside real torchrun workers for the tensor-parallel tests (started by
tp_ollama.launch.run_workers); each returns plain data to the test process."""

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
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    init_distributed("gloo", 60)
    comm = make_comm(comm_kind, 60)
    mesh = init_device_mesh("cpu", (comm.world_size,))
    out: dict[str, Any] = {"rank": comm.rank, "pid": os.getpid()}
    for d in dirs:
        ckpt = open_checkpoint(Path(d))
        layout = TPLayout.build(ckpt.config, comm.world_size, weights)
        shard = partial(apply_tp, layout=layout, comm=comm, device_mesh=mesh)
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
