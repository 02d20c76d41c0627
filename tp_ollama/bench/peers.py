"""Other engines on the same file, measured the same way as the engine itself: transformers
(same checkpoint, in its own process) and llama.cpp through llama-cpp-python (same GGUF, same thread
count). Both are optional: a missing package is a clear error naming what to install.

Each measurement runs in a fresh Python process (`python -m tp_ollama.bench.peers ...`) so that its
peak RSS and its cold start (process start to first token) are its own. The prompt is the same token
ids the engine bench uses; decoding is greedy for exactly `gen_tokens` tokens (end-of-text ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tp_ollama.bench.report import peak_rss_mb
from tp_ollama.errors import ConfigError, TpOllamaError

PEERS = ("transformers", "llama.cpp")
INSTALL = {"transformers": "pip install transformers", "llama.cpp": "pip install llama-cpp-python"}
MARK = "@@peer "


def run_peer(
    kind: str, model: Path, prompt_tokens: int, gen_tokens: int, threads: int, dtype: str = "float32", timeout_s=600.0
) -> dict[str, Any]:
    """Measure one peer in a fresh process; returns decode/prompt tok/s, ttft, load, cold start, peak RSS."""
    if kind not in PEERS:
        raise ConfigError(f"peer {kind!r} is not supported; supported: {', '.join(PEERS)}")
    if kind == "llama.cpp" and model.suffix != ".gguf":
        raise ConfigError(f"llama.cpp needs a GGUF file, got {model}")
    cmd = [sys.executable, "-m", "tp_ollama.bench.peers", kind, str(model), str(prompt_tokens), str(gen_tokens),
           str(threads), dtype]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TpOllamaError(f"{kind} on {model} did not finish within {timeout_s:g} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TpOllamaError(f"{kind} on {model} failed (exit {done.returncode}): {tail}")
    out: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    out["cold_start_s"] = out.pop("first_token_at") - started
    return out


def _transformers(model: Path, n_prompt: int, gen: int, dtype: str) -> dict[str, Any]:
    import torch

    try:
        import transformers as tf
    except ImportError:
        raise ConfigError(f"the transformers peer needs transformers: {INSTALL['transformers']}") from None
    t0 = time.perf_counter()
    if model.suffix == ".gguf":
        m = tf.AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=getattr(torch, dtype))
    else:
        m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    m.eval()
    load_s = time.perf_counter() - t0
    from tp_ollama.bench.decode import prompt_ids

    ids = torch.tensor([prompt_ids(n_prompt, m.config.vocab_size)])
    with torch.inference_mode():
        t1 = time.perf_counter()
        out = m(ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        first_token_at, ttft_s = time.time(), time.perf_counter() - t1
        t2 = time.perf_counter()
        for _ in range(gen - 1):
            out = m(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t2
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    return {
        "load_s": load_s, "ttft_s": ttft_s, "decode_s": decode_s, "first_token_at": first_token_at,
        "weight_bytes": weight_bytes,
    }  # fmt: skip


def _llama_cpp(model: Path, n_prompt: int, gen: int, threads: int) -> dict[str, Any]:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ConfigError(f"the llama.cpp peer needs llama-cpp-python: {INSTALL['llama.cpp']}") from None
    from tp_ollama.bench.decode import prompt_ids

    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(model), n_ctx=n_prompt + gen + 8, n_batch=max(n_prompt, 32), n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    ids = prompt_ids(n_prompt, llm.n_vocab())
    t1 = time.perf_counter()
    llm.eval(ids)
    token = llm.sample(temp=0.0)
    first_token_at, ttft_s = time.time(), time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in range(gen - 1):
        llm.eval([token])
        token = llm.sample(temp=0.0)
    decode_s = time.perf_counter() - t2
    return {"load_s": load_s, "ttft_s": ttft_s, "decode_s": decode_s, "first_token_at": first_token_at}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one peer measurement (used by `tp-ollama bench compare`)")
    ap.add_argument("kind", choices=PEERS)
    ap.add_argument("model", type=Path)
    ap.add_argument("prompt_tokens", type=int)
    ap.add_argument("gen_tokens", type=int)
    ap.add_argument("threads", type=int)
    ap.add_argument("dtype")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.kind == "transformers":
        out = _transformers(a.model, a.prompt_tokens, a.gen_tokens, a.dtype)
    else:
        out = _llama_cpp(a.model, a.prompt_tokens, a.gen_tokens, a.threads)
    out["decode_tok_s"] = (a.gen_tokens - 1) / out["decode_s"]
    out["prompt_tok_s"] = a.prompt_tokens / out["ttft_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    print(MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    try:
        main()
    except TpOllamaError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
