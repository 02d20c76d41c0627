"""Which constrained-decoding library to use for structured outputs: xgrammar, llguidance and
outlines-core measured on the embedded models' tokenizers (gemma3:270m, 262k tokens; smollm2:135m,
49k tokens). For each: the one-off cost per model (vocabulary preparation), the cost per request
(compiling `format: "json"` and a nested schema) and the cost per generated token (computing the
next-token mask, then advancing with the chosen token), over a valid answer fed token by token.
Run it in a fresh process: the import time of each library is part of the record.

    python bench/structured.py [--out bench/results/structured.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"city": "London", "zip": "W1"},
          "tags": ["math", "engines", "poetry"]}  # fmt: skip


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def bench_xgrammar(hf: Any, vocab: int, eos: list[int], ids: list[int]) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    info, t_info = _timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    g_json, t_json = _timed(lambda: compiler.compile_builtin_json_grammar())
    g_schema, t_schema = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    matcher = xgr.GrammarMatcher(g_schema)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        ok = matcher.accept_token(t)
        steps.append(time.perf_counter() - t0)
        if not ok:
            raise RuntimeError(f"xgrammar refused token {t}")
    del g_json, torch
    return {"prepare_vocab_s": t_info, "compile_json_s": t_json, "compile_schema_s": t_schema, "steps": steps}


def bench_llguidance(hf: Any, vocab: int, eos: list[int], ids: list[int]) -> dict[str, Any]:
    import llguidance
    import llguidance.torch

    # As tp_ollama.engine.constraint builds it: from the tokenizer.json text, in Rust.
    tok, t_info = _timed(lambda: llguidance.LLTokenizer(hf.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=eos))
    any_json = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    m_json, t_json = _timed(lambda: llguidance.LLMatcher(tok, any_json))
    schema = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher, t_schema = _timed(lambda: llguidance.LLMatcher(tok, schema))
    if matcher.is_error():
        raise RuntimeError(matcher.get_error())
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        ok = matcher.consume_token(t)
        steps.append(time.perf_counter() - t0)
        if not ok:
            raise RuntimeError(f"llguidance refused token {t}: {matcher.get_error()}")
    del m_json
    return {"prepare_vocab_s": t_info, "compile_json_s": t_json, "compile_schema_s": t_schema, "steps": steps}


def bench_outlines(hf: Any, vocab: int, eos: list[int], ids: list[int]) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    def make_vocab() -> Any:
        # outlines-core wants each token's text: decode ids one by one ("▁"/"Ġ" spaces restored,
        # byte tokens as their byte), as its own Vocabulary.from_pretrained does for HF models.
        pieces: dict[str, list[int]] = {}
        for token, i in hf.get_vocab().items():
            if i in eos or i >= vocab:
                continue
            text = hf.convert_tokens_to_string([token])
            if token.startswith("▁") and not text.startswith(" "):
                text = " " + text
            pieces.setdefault(text, []).append(i)
        return Vocabulary(eos[0], pieces)

    voc, t_info = _timed(make_vocab)
    # outlines-core compiles regular expressions: "any JSON object" has no finite regex, so
    # format "json" would need a depth-limited schema; the schema case is measured.
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index, t_schema = _timed(lambda: Index(regex, voc))
    guide = Guide(index)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        guide.get_tokens()
        guide.advance(t)
        steps.append(time.perf_counter() - t0)
    return {"prepare_vocab_s": t_info, "compile_json_s": None, "compile_schema_s": t_schema, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/structured.json")
    parser.add_argument("--skip", default="", help="comma-separated libraries to skip")
    args = parser.parse_args()
    import torch
    from transformers import PreTrainedTokenizerFast

    from tp_ollama.checkpoints.loader import open_checkpoint
    from tp_ollama.checkpoints.tokenizer import Tokenizer
    from tp_ollama.store.embedded import resolve_model

    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": platform.machine(), "threads": 1, "models": {}}
    for model in ("gemma3:270m", "smollm2:135m"):
        path = resolve_model(model)
        tokenizer = Tokenizer.from_gguf(path)
        ckpt = open_checkpoint(path)
        vocab = int(ckpt.config.vocab_size)
        ckpt.close()
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer._backend)
        eos = sorted(tokenizer.eos_ids)
        text = json.dumps(ANSWER)  # ", " and ": " separators, as both libraries emit by default
        ids = tokenizer.encode(text, add_special_tokens=False)
        entry: dict[str, Any] = {"vocab": vocab, "answer_tokens": len(ids)}
        for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance),
                         ("outlines-core", bench_outlines)):  # fmt: skip
            if name in args.skip.split(","):
                continue
            module = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines_core"}[name]
            t0 = time.perf_counter()
            importlib.import_module(module)
            import_s = time.perf_counter() - t0
            try:
                r = fn(hf, vocab, eos, ids)
            except Exception as e:  # a library that cannot do the job is a result too
                entry[name] = {"error": f"{type(e).__name__}: {e}"}
                print(model, name, "error:", e)
                continue
            steps = r.pop("steps")
            if model == "gemma3:270m":
                r["import_s"] = import_s  # the first model pays it
            r["mask_step_median_us"] = statistics.median(steps) * 1e6
            r["mask_step_p99_us"] = sorted(steps)[int(0.99 * (len(steps) - 1))] * 1e6
            r["mask_step_max_us"] = max(steps) * 1e6
            entry[name] = r
            print(model, name, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
        results["models"][model] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
