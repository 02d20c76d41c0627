"""Text in, text out over an engine loop in this process (a group of one): load a model with its
tokenizer, stream the text of a prompt. The in-process reference of the tests and benchmarks; the
one-shot CLI and the TP worker use its `final_metrics` (their text goes through text/process.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.direct import DirectEngine, GenerationStats
from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.state import EngineJob
from tp_ollama.store.embedded import resolve_model
from tp_ollama.text.pipeline import PlainText, TextPipeline
from tp_ollama.text.prompt import tokenizer_at

__all__ = ["LoadedModel", "final_metrics", "load", "stream_text", "text_pieces"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model loaded in this process behind the engine's loop (a group of one), with its tokenizer."""

    name: str
    path: Path
    engine: DirectEngine
    tokenizer: Tokenizer
    dtype: str
    load_seconds: float

    @property
    def model(self) -> nn.Module:
        model = self.engine.state.model
        assert model is not None
        return model


def load(model: str, dtype: str = "auto", device: str = "cpu", quant: str = "auto", num_ctx: int = 4096) -> LoadedModel:
    """Resolve a model name or path, load it and its tokenizer."""
    t0 = time.perf_counter()
    path = resolve_model(model)
    tokenizer = tokenizer_at(path)
    engine = DirectEngine(EngineJob(device=str(device), kv_cache_bytes=None))
    engine.load(str(path), dtype, num_ctx, quant)
    seconds = time.perf_counter() - t0
    log.info("loaded %s (%s) as %s in %.2f s", model, path, dtype, seconds)
    return LoadedModel(model, path, engine, tokenizer, dtype, seconds)


def stream_text(
    loaded: LoadedModel, prompt: list[int], options: GenerationOptions, stats: GenerationStats | None = None
) -> Iterator[str]:
    """Yield pieces of generated text; stop strings end the stream and are never emitted."""
    stats = stats if stats is not None else GenerationStats()
    tokens = loaded.engine.generate(prompt, options, loaded.tokenizer.eos_ids, stats=stats)
    return text_pieces(loaded.tokenizer, tokens, options.stop, stats)


def final_metrics(stats: GenerationStats, load_s: float, total_s: float) -> dict[str, int]:
    """A generation's figures as Ollama's final chunk names them (client.format.stats prints them)."""
    return {
        "total_duration": int(total_s * 1e9),
        "load_duration": int(load_s * 1e9),
        "prompt_eval_count": stats.prompt_eval_count,
        "prompt_eval_duration": stats.prompt_eval_duration,
        "eval_count": stats.eval_count,
        "eval_duration": stats.eval_duration,
    }


def text_pieces(
    tokenizer: Tokenizer, tokens: Generator[int, None, None], stops: Sequence[str], stats: GenerationStats
) -> Iterator[str]:
    """Turn a token stream into text pieces, cutting at the first stop string (never emitted)."""
    text = TextPipeline(tokenizer, stops, PlainText())
    try:
        for token in tokens:
            yield from text.push(token)
            if text.stopped:
                stats.done_reason = "stop"
                return
        yield from text.finish()
    finally:
        tokens.close()  # frees the KV cache (and releases the other ranks) when the consumer stops early
