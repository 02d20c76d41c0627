"""Sampling and generation options with Ollama's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from tp_ollama.errors import RequestError


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen. temperature 0 means greedy over the penalised logits (no truncation)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                # inf or NaN would turn masked -inf logits into NaN probabilities.
                _check(math.isfinite(value), f.name, value, "a finite number")
        _check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        _check(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 disables it)")
        _check(0 <= self.top_p <= 1, "top_p", self.top_p, "a number in [0, 1]")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(0 < self.typical_p <= 1, "typical_p", self.typical_p, "a number in (0, 1]")
        _check(self.repeat_penalty > 0, "repeat_penalty", self.repeat_penalty, "a number > 0")
        last_n = self.repeat_last_n
        _check(last_n >= -1, "repeat_last_n", last_n, "an integer >= -1 (-1: num_ctx)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationOptions:
    """Everything one request asks of the engine besides its prompt tokens."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    num_predict: int = -1  # -1: until EOS or num_ctx; -2: fill the context (Ollama's meaning)
    num_ctx: int = 4096
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.num_predict >= -2, "num_predict", self.num_predict, "an integer >= -2")
        _check(self.num_ctx >= 1, "num_ctx", self.num_ctx, "an integer >= 1")

    @classmethod
    def from_ollama(cls, options: dict[str, Any]) -> GenerationOptions:
        """Build from an Ollama `options` object; unknown runner options are ignored like upstream."""
        sampling_names = {f.name for f in fields(SamplingOptions)}
        sampling: dict[str, Any] = {
            k: _number(k, v, integer=k in _INT_OPTIONS)
            for k, v in options.items()
            if k in sampling_names and v is not None
        }
        kwargs: dict[str, Any] = {"sampling": SamplingOptions(**sampling)}
        for name in ("num_predict", "num_ctx"):
            if options.get(name) is not None:
                kwargs[name] = _number(name, options[name], integer=True)
        stop = options.get("stop")
        if stop is not None:
            kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(**kwargs)


_INT_OPTIONS = frozenset({"top_k", "seed", "repeat_last_n"})


def _number(name: str, value: object, *, integer: bool) -> int | float:
    """Coerce a JSON number like upstream (ints truncate 40.0 or 40.7 to 40); anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"option {name}={value!r} is invalid: expected a number")
    if not integer:
        return float(value)
    _check(math.isfinite(value), name, value, "a finite integer")
    return int(value)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise RequestError(f"option {name}={value!r} is invalid: expected {expected}")


def check_prompt(n_prompt: int, options: GenerationOptions) -> None:
    """A prompt of `n_prompt` tokens can run with these options (RequestError naming the numbers if not)."""
    if n_prompt == 0:
        raise RequestError("the prompt is empty: at least one token is needed")
    if n_prompt >= options.num_ctx:
        raise RequestError(
            f"the prompt is {n_prompt} tokens long, which does not fit num_ctx={options.num_ctx}; "
            "raise num_ctx or shorten the prompt"
        )
