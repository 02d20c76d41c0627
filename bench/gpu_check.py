"""The CUDA path in one run, for a machine with a GPU: parity of every family on CUDA at TP=1 against
transformers on the CPU, TP=2 with two ranks on one GPU (NCCL refuses that, so collectives are staged
through host memory) against TP=1, and decode speed of random-weight models of real shapes.

    python bench/gpu_check.py --out bench/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.parallel.tp_entry import sharded_runs
from tests.tiny import MODEL_TYPES, make_hf_model, prompt_ids, save_hf
from tp_ollama.checkpoints.loader import load_model, open_checkpoint
from tp_ollama.engine.direct import GenerationStats, generate_ids
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.launch import Cluster, run_workers

N_PROMPT = 20
GREEDY32 = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=32, num_ctx=128)


def stepwise(model: Any, tokens: list[int], device: str) -> torch.Tensor:
    cache = KVCache.for_model(model, batch=1, max_len=len(tokens) + 1)
    with torch.inference_mode():
        ids = torch.tensor([tokens[:N_PROMPT]], device=device)
        rows = [model.logits(model.hidden_states(ids, torch.arange(N_PROMPT, device=device)[None], cache))[0]]
        for i in range(N_PROMPT, len(tokens)):
            t = torch.tensor([[tokens[i]]], device=device)
            rows.append(model.logits(model.hidden_states(t, torch.tensor([[i]], device=device), cache))[0])
    return torch.cat(rows).float().cpu()


def parity_tp1(dirs: dict[str, Path], hf_models: dict[str, Any], device: str) -> list[dict[str, Any]]:
    out = []
    tokens = prompt_ids(N_PROMPT + 16)
    for kind, d in dirs.items():
        hf = hf_models[kind]
        with torch.no_grad():
            cont = hf.generate(torch.tensor([tokens[:N_PROMPT]]), max_new_tokens=32, do_sample=False,
                               min_new_tokens=32, pad_token_id=0)[0, N_PROMPT:].tolist()  # fmt: skip
            ref = hf(torch.tensor([tokens])).logits[0]
        model = load_model(open_checkpoint(d), torch.float32, device)
        err = float((stepwise(model, tokens, device) - ref).abs().max())
        greedy = list(generate_ids(model, tokens[:N_PROMPT], GREEDY32, frozenset()))
        out.append({"model_type": kind, "max_abs_logit_diff": err, "greedy_32_identical": greedy == cont})
    return out


def parity_tp2(dirs: dict[str, Path], comm: str, device: str) -> list[dict[str, Any]]:
    tokens = prompt_ids(N_PROMPT + 16)
    paths = [str(d) for d in dirs.values()]
    results = run_workers(Cluster(nproc_per_node=2), sharded_runs, paths, tokens, N_PROMPT, None, comm, device)
    out = []
    for kind, d in dirs.items():
        model = load_model(open_checkpoint(d), torch.float32, device)
        ref = stepwise(model, tokens, device).numpy()
        greedy = list(generate_ids(model, tokens[:N_PROMPT], GREEDY32, frozenset()))
        full = np.zeros_like(ref)
        for r in (0, 1):
            a, b = results[r][str(d)]["span"]
            full[:, a:b] = results[r][str(d)]["logits"]
        out.append({
            "model_type": kind,
            "comm": comm,
            "max_abs_logit_diff_vs_tp1": float(np.abs(full - ref).max()),
            "greedy_32_identical": all(results[r][str(d)]["greedy"] == greedy for r in (0, 1)),
        })  # fmt: skip
    return out


def real_shape(kind: str, directory: Path) -> Path:
    """Random weights in the shape of a real model (no download): Gemma 3 270M or Llama 3.2 1B."""
    import transformers as tf

    if kind == "gemma3-270m-shape":
        cfg = tf.Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                  query_pre_attn_scalar=256, max_position_embeddings=32768)  # fmt: skip
    else:
        cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                             max_position_embeddings=8192)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory / kind)
    return directory / kind


def decode_speed(path: Path, dtype: torch.dtype, device: str, n: int = 128) -> dict[str, Any]:
    model = load_model(open_checkpoint(path), dtype, device)
    options = GenerationOptions(sampling=SamplingOptions(temperature=0), num_predict=n, num_ctx=1024)
    stats = GenerationStats()
    gen = generate_ids(model, list(range(10, 42)), options, stats=stats)
    next(gen)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    count = sum(1 for _ in gen)
    sync()
    seconds = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "decode_tok_s": count / seconds,
        "weight_gb": weight_bytes / 1e9,
        "achieved_gb_s": weight_bytes * count / seconds / 1e9,
        "prefill_ms_32_tokens": stats.prompt_eval_duration / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    device = args.device  # "cpu" dry-runs the script without a GPU
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def section(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-3000:]}
        print(name, f"{time.perf_counter() - t0:.1f} s", json.dumps(report[name])[:2000], flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        hf_models = {k: make_hf_model(k) for k in MODEL_TYPES}
        dirs = {k: save_hf(m, Path(tmp) / k) for k, m in hf_models.items()}
        section("parity_cuda_tp1_vs_transformers_cpu", lambda: parity_tp1(dirs, hf_models, device))
        section("parity_cuda_tp2_one_gpu_shm", lambda: parity_tp2(dirs, "auto", device))
        section("parity_cuda_tp2_one_gpu_gloo", lambda: parity_tp2(dirs, "gloo", device))
        for kind in () if args.skip_speed else ("gemma3-270m-shape", "llama3.2-1b-shape"):
            path = real_shape(kind, Path(tmp))
            section(
                f"decode_{kind}",
                lambda p=path: [decode_speed(p, torch.float32, device), decode_speed(p, torch.bfloat16, device)],
            )


if __name__ == "__main__":
    main()
