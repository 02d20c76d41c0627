"""Token-level generation for one sequence: prefill, then decode one token a step.

Speaks token ids only. Stop strings and text belong to the caller (tp_ollama.completion)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from tp_ollama.engine.constraint import Constraint
from tp_ollama.engine.kv_cache import KVCache
from tp_ollama.engine.options import GenerationOptions, check_prompt
from tp_ollama.engine.sampler import Sampler
from tp_ollama.models.native_decode import native_decoder


@dataclass
class GenerationStats:
    """Counts and nanosecond durations, named like Ollama's final-chunk metrics."""

    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    done_reason: str = ""  # "stop" (EOS / end of turn / stop string) or "length"
    tokens: list[int] = field(default_factory=list)


class Lockstep(Protocol):
    """Keeps the ranks of a tensor-parallel group on the same step: rank 0, whose caller may stop
    early (a stop string, a dropped client), tells the others before every decode step."""

    def proceed(self) -> bool: ...

    def stop(self) -> None: ...


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    options: GenerationOptions,
    eos_ids: frozenset[int],
    stats: GenerationStats | None = None,
    sampler_factory: Callable[..., Callable[[torch.Tensor, Sequence[int]], int]] = Sampler,
    lockstep: Lockstep | None = None,
    constraint: Constraint | None = None,
) -> Generator[int, None, None]:
    """Yield generated token ids until an end token (not yielded), num_predict or num_ctx.

    `constraint` (structured outputs) masks the logits before each choice and learns each token.
    The caller may stop iterating at any time (a stop string, a dropped client)."""
    stats = stats if stats is not None else GenerationStats()
    n_prompt = len(prompt)
    check_prompt(n_prompt, options)
    limit = options.num_ctx - n_prompt  # tokens that still fit the context
    if options.num_predict >= 0:
        limit = min(limit, options.num_predict)
    vocab = model.config.vocab_size  # type: ignore[union-attr]
    sampler = sampler_factory(options.sampling, vocab)
    cache = KVCache.for_model(model, batch=1, max_len=options.num_ctx)
    history = list(prompt)

    device: torch.device = next(model.parameters()).device
    t0 = time.perf_counter_ns()
    ids = torch.tensor([history], dtype=torch.long, device=device)
    positions = torch.arange(n_prompt, dtype=torch.long, device=device)[None]
    logits = _last_logits(model, ids, positions, cache)
    stats.prompt_eval_count = n_prompt
    stats.prompt_eval_duration = time.perf_counter_ns() - t0

    t0 = time.perf_counter_ns()
    try:
        while stats.eval_count < limit:
            if constraint is not None:
                logits = constraint.restrict(logits)
            token = sampler(logits, history)
            if token in eos_ids:
                stats.done_reason = "stop"
                return
            if constraint is not None:
                constraint.accept(token)
            history.append(token)
            stats.tokens.append(token)
            stats.eval_count += 1
            yield token
            if stats.eval_count >= limit:
                break
            if lockstep is not None and not lockstep.proceed():
                stats.done_reason = "stop"
                return
            logits = _next_logits(model, token, len(history) - 1, cache, device)
        stats.done_reason = "length"
    except GeneratorExit:
        if lockstep is not None:
            lockstep.stop()
        raise
    finally:
        stats.eval_duration = time.perf_counter_ns() - t0


def _next_logits(model: nn.Module, token: int, pos: int, cache: KVCache, device: torch.device) -> torch.Tensor:
    """The logits after `token` at position `pos`: the native step straight from the ints where it
    takes them (a step costs ~10 ms, and every torch operator around it ~0.02-0.1 ms), else the modules."""
    decoder = native_decoder(model)
    if decoder is not None and decoder.takes_tokens and decoder.fits_at(pos, cache):
        return decoder.step(token, pos, cache)
    ids = torch.tensor([[token]], dtype=torch.long, device=device)
    return _last_logits(model, ids, torch.tensor([[pos]], dtype=torch.long, device=device), cache)


def _last_logits(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    decoder = native_decoder(model) if ids.shape[1] == 1 else None
    if decoder is not None and decoder.fits(ids, positions, cache):
        if decoder.takes_tokens:
            return decoder.logits(ids, positions, cache)  # token to logits in one native call
        hidden = decoder.hidden_states(ids, positions, cache)  # all layers in one native call
    else:
        hidden = model.hidden_states(ids, positions, cache)  # type: ignore[operator]  # (1, T, hidden)
    return model.logits(hidden[:, -1]).float()[0]  # type: ignore[operator]  # (vocab,)
