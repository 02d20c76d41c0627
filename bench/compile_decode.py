"""Does torch.compile (inductor, CPU) speed up a decode step? gemma3:270m with int4 weights and
bfloat16 activations, one token per step: the eager step against (a) the whole body compiled (the
KV cache bookkeeping breaks the graph) and (b) only the post-attention half of each block (norms,
residuals, MLP: no graph break). Compile time is reported too; the packed matmuls stay extern calls.

    PYTHONPATH=. python bench/compile_decode.py        # writes bench/results/compile_decode.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def per_call_us(fn: Any, n: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    from tp_ollama.checkpoints.loader import load_model, open_checkpoint
    from tp_ollama.engine.kv_cache import KVCache
    from tp_ollama.store.embedded import resolve_model

    torch.set_num_threads(2)
    model = load_model(open_checkpoint(resolve_model("gemma3:270m")), torch.bfloat16, quant="int4")
    block = model.model.layers[0]

    def post_attention(x: torch.Tensor, h: torch.Tensor, blk: Any) -> torch.Tensor:
        x = x + blk.post_attention_layernorm(h)
        h = blk.mlp(blk.pre_feedforward_layernorm(x))
        return x + blk.post_feedforward_layernorm(h)

    x = torch.randn(1, 1, 640, dtype=torch.bfloat16)
    h = torch.randn(1, 1, 640, dtype=torch.bfloat16)
    report: dict[str, Any] = {"model": "gemma3:270m", "quant": "int4", "dtype": "bfloat16", "threads": 2}
    report["machine"] = {"platform": platform.platform()}
    with torch.inference_mode():
        report["post_attention_eager_us"] = per_call_us(lambda: post_attention(x, h, block), 300)
        t = time.perf_counter()
        compiled = torch.compile(post_attention, dynamic=False)
        compiled(x, h, block)
        report["post_attention_compile_s"] = time.perf_counter() - t
        report["post_attention_compiled_us"] = per_call_us(lambda: compiled(x, h, block), 300)

        def steps(body: Any) -> float:
            cache = KVCache.for_model(model, 1, 512)
            ids, pos = torch.tensor([[5]]), torch.tensor([[0]])

            def one() -> None:
                nonlocal pos
                model.logits(body(ids, pos, cache))
                pos = pos + 1

            return per_call_us(one, 60) / 1e3

        report["step_eager_ms"] = steps(model.hidden_states)
        t = time.perf_counter()
        body = torch.compile(model.hidden_states, dynamic=True)
        cache = KVCache.for_model(model, 1, 512)
        body(torch.tensor([[5]]), torch.tensor([[0]]), cache)
        report["step_compile_s"] = time.perf_counter() - t
        report["step_compiled_ms"] = steps(body)
    out = Path(__file__).parent / "results" / "compile_decode.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
