"""How faithful each precision setting is: the next-token distribution of a model loaded at that
setting, against the same file dequantized to float32, over a fixed text (bench/data/quality.txt,
the first sections of the GNU GPL v3, whose license allows verbatim copies: ~2,000 tokens of plain
English). The figures are the ones llama.cpp's `llama-perplexity --kl-divergence` reports:

- top-1 agreement: the fraction of positions where the setting's most likely next token is the
  reference's (greedy text stays the same exactly as long as this holds);
- mean KL divergence KL(reference || setting) of the next-token distributions, in nats;
- perplexity of the text under the setting.

Each setting decodes the text the way it serves it: one token a step after the chunk's first token,
through the same modules and kernels as generation, with a contiguous cache. The reference is the
float32-dequantized model (`--quant none --dtype float32`), whose batched forward equals its
stepwise one. llama.cpp (llama-cpp-python, same GGUF, same token ids) evaluates each chunk in one
batch, as `llama-perplexity` does. The text is cut into chunks of CHUNK tokens, each starting
with the beginning-of-text token, and every position after the first SKIP of a chunk is scored.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tp_ollama.bench.report import add_result, new_report, summarize
from tp_ollama.errors import ConfigError

TEXT = Path(__file__).parent / "data" / "quality.txt"
CHUNK = 512
SKIP = 16  # positions with too little context to say much, as llama-perplexity skips the first half
MIN_TOKENS = 2000
DEFAULT_SETTINGS = ("auto/auto", "int8/auto", "int4/auto", "auto/bfloat16")


@dataclass
class Tally:
    """Running sums over the scored positions of one setting."""

    positions: int = 0
    agree: int = 0
    nll: float = 0.0
    seconds: float = 0.0
    kl_values: list[float] = field(default_factory=list)

    def add(self, ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """ref_logp, logp: (N, vocab) log-probabilities; targets: (N,) the text's next tokens."""
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)
        self.positions += len(targets)
        self.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        self.kl_values.extend(kl.tolist())
        self.nll -= float(logp.gather(-1, targets[:, None]).sum())

    def figures(self) -> dict[str, float | int]:
        n = max(self.positions, 1)
        kl = summarize(self.kl_values)  # p99 interpolated as every other p99 of the reports
        return {
            "top1_agreement": self.agree / n,
            "mean_kl": kl["mean"] or 0.0,
            "p99_kl": kl["p99"] or 0.0,
            "max_kl": max(self.kl_values, default=0.0),
            "perplexity": math.exp(self.nll / n),
            "positions": self.positions,
        }


def parse_setting(spec: str) -> tuple[str, str]:
    """`QUANT/DTYPE` (auto/auto, int4/float32...) -> (quant, dtype)."""
    from tp_ollama.checkpoints.loader import DTYPES
    from tp_ollama.config.settings import QUANT_MODES

    quant, sep, dtype = spec.partition("/")
    if not sep or quant not in QUANT_MODES or dtype not in ("auto", *DTYPES):
        raise ConfigError(
            f"precision setting {spec!r} is not QUANT/DTYPE with QUANT one of {', '.join(QUANT_MODES)} "
            f"and DTYPE one of auto, {', '.join(DTYPES)}"
        )
    return quant, dtype


def text_chunks(tokenizer: Any, text: str, chunk: int = CHUNK) -> list[list[int]]:
    """The text's token ids in chunks of `chunk`, each led by the beginning-of-text token where the
    tokenizer has one (the last, shorter chunk is kept when it has more than SKIP positions to score)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_id", None)
    lead = [bos] if bos is not None else []
    body = chunk - len(lead)
    chunks = [lead + ids[i : i + body] for i in range(0, len(ids), body)]
    return [c for c in chunks if len(c) > SKIP + 1]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def reference_log_probs(model: torch.nn.Module, chunk: Sequence[int]) -> torch.Tensor:
    """(len(chunk) - 1, vocab): the float32 model's next-token log-probabilities, one batched forward."""
    from tp_ollama.engine.kv_cache import KVCache

    cache = KVCache.for_model(model, batch=1, max_len=len(chunk))
    with torch.inference_mode():
        h = model.hidden_states(torch.tensor([chunk]), torch.arange(len(chunk))[None], cache)  # type: ignore[operator]
        return _log_probs(model.logits(h)[0, :-1])  # type: ignore[operator]


def stepwise_log_probs(model: torch.nn.Module, chunk: Sequence[int]) -> Iterator[torch.Tensor]:
    """The model's next-token log-probabilities after each position but the last, decoded one token
    a step (what generation does), yielded a (vocab,) row at a time."""
    from tp_ollama.engine.kv_cache import KVCache

    cache = KVCache.for_model(model, batch=1, max_len=len(chunk))
    with torch.inference_mode():
        for i, token in enumerate(chunk[:-1]):
            h = model.hidden_states(torch.tensor([[token]]), torch.tensor([[i]]), cache)  # type: ignore[operator]
            yield _log_probs(model.logits(h)[0, -1])  # type: ignore[operator]


def llama_cpp_log_probs(path: Path, threads: int) -> Callable[[Sequence[int]], torch.Tensor]:
    """A function from a chunk to llama.cpp's (len - 1, vocab) log-probabilities on the same GGUF."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ConfigError("the llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python") from None
    llm = Llama(model_path=str(path), n_ctx=CHUNK, n_batch=CHUNK, logits_all=True, n_threads=threads, verbose=False)

    def run(chunk: Sequence[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(list(chunk))
        scores = torch.from_numpy(llm.scores[: len(chunk) - 1].copy())
        return _log_probs(scores)

    return run


def run_quality(
    model: str,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    llama_cpp: bool = True,
    threads: int | None = None,
    max_tokens: int | None = None,
    text_path: Path = TEXT,
    argv: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A `quality` report: one result per precision setting (and llama.cpp), against the float32 model."""
    import os

    from tp_ollama.checkpoints.loader import load_model, open_checkpoint, resolve_dtype
    from tp_ollama.store.embedded import resolve_model
    from tp_ollama.text.prompt import tokenizer_at

    parsed = [(spec, *parse_setting(spec)) for spec in settings]
    path = resolve_model(model)
    tokenizer = tokenizer_at(path)
    chunks = text_chunks(tokenizer, text_path.read_text())
    if max_tokens is not None:
        chunks = _first_tokens(chunks, max_tokens)
    total = sum(len(c) for c in chunks)
    if max_tokens is None and total < MIN_TOKENS:
        raise ConfigError(f"{text_path} gives {total} tokens; the measure needs at least {MIN_TOKENS}")
    threads = threads or os.cpu_count() or 1
    report = new_report(
        "quality",
        {"model": model, "path": str(path), "text": text_path.name, "tokens": total, "chunk": CHUNK,
         "skip": SKIP, "reference": "quant none, dtype float32", "threads": threads},
        argv,
    )  # fmt: skip
    say = progress or (lambda _: None)
    ckpt = open_checkpoint(path)
    reference = load_model(ckpt, torch.float32, quant="none")
    candidates: list[tuple[str, dict[str, Any], Callable[[Sequence[int]], Iterator[torch.Tensor] | torch.Tensor]]]
    candidates = []
    for spec, quant, dtype in parsed:
        resolved = resolve_dtype(dtype, "cpu", ckpt, quant)
        loaded = load_model(ckpt, resolved, quant=quant)
        config = {"quant": quant, "dtype": dtype, "resolved_dtype": str(resolved).removeprefix("torch.")}
        candidates.append((f"tp-ollama {spec}", config, functools.partial(stepwise_log_probs, loaded)))
    if llama_cpp:
        if path.suffix != ".gguf":
            report["notes"].append(f"llama.cpp skipped: {path} is not a GGUF file")
        else:
            try:
                peer = llama_cpp_log_probs(path, threads)
                candidates.append(("llama.cpp", {"quant": "file", "dtype": "llama.cpp"}, peer))
            except ConfigError as e:
                report["notes"].append(f"llama.cpp skipped: {e}")
    tallies = {label: Tally() for label, _, _ in candidates}
    own = Tally()  # the reference against itself: its perplexity, for scale
    torch.set_num_threads(threads)
    for n, chunk in enumerate(chunks):
        say(f"chunk {n + 1}/{len(chunks)}: reference")
        ref = reference_log_probs(reference, chunk)[SKIP:]
        targets = torch.tensor(chunk[SKIP + 1 :])
        own.add(ref, ref, targets)
        for label, _, fn in candidates:
            say(f"chunk {n + 1}/{len(chunks)}: {label}")
            t0 = time.perf_counter()
            out = fn(chunk)
            rows = out[SKIP:] if isinstance(out, torch.Tensor) else torch.stack(list(out))[SKIP:]
            tallies[label].seconds += time.perf_counter() - t0
            tallies[label].add(ref, rows, targets)
    ckpt.close()
    add_result(report, "reference (float32)", {"quant": "none", "dtype": "float32", "resolved_dtype": "float32"},
               rounds=1, quality=own.figures())  # fmt: skip
    for label, config, _ in candidates:
        tally = tallies[label]
        add_result(report, label, config, rounds=1, **{"quality": tally.figures(), "extra": {"seconds": tally.seconds}})
    return report


def _first_tokens(chunks: list[list[int]], max_tokens: int) -> list[list[int]]:
    out, left = [], max_tokens
    for chunk in chunks:
        if left <= SKIP + 1:
            break
        out.append(chunk[:left])
        left -= len(out[-1])
    return out
