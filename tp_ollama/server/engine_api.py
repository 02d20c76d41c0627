"""What the HTTP front end needs from an engine: token ids in, token ids out.

`EngineClient` implements it over engine rank 0's socket (a torchrun group for `serve --tp N` and
`launch`; the tests also run the same loop in a thread of their own process). The front end owns
text: tokenization, templates, stop strings and detokenization happen before and after these calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.protocol import OutputFormat


@dataclass(frozen=True)
class LoadRequest:
    path: Path  # a GGUF file or HF directory on node 0
    dtype: str = "auto"
    num_ctx: int = 4096
    quant: str = "auto"
    # The model's files (name in an HF directory or "", blob digest, size): nodes without them read
    # their slices from node 0. Empty: `path` is read on every node.
    files: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    dtype: str
    num_ctx: int
    world_size: int
    # Per-rank shares (TPLayout.describe()) and sizes, for /api/ps and the cluster endpoints.
    layout: list[dict[str, Any]] = field(default_factory=list)
    size_bytes: int = 0
    quant: str = "auto"
    # What the engine made of dtype and quant: {"dtype": "bfloat16", "weights": {"int8": 126, ...}}.
    precision: dict[str, Any] = field(default_factory=dict)
    files: tuple[tuple[str, str, int], ...] = ()  # as in LoadRequest


@dataclass
class TokenEvent:
    """One generated token, or the final event (token None) with Ollama-style counts and durations."""

    token: int | None
    done: bool = False
    done_reason: str = ""  # "stop" or "length" on the final event
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0  # ns
    eval_count: int = 0
    eval_duration: int = 0  # ns
    comm_duration: int = 0  # ns spent in collectives during this request (0 on one rank)


class Engine(Protocol):
    async def load(self, request: LoadRequest) -> LoadedModel:
        """Load (or keep, if already loaded with the same settings) a model; replaces any other."""
        ...

    async def unload(self) -> None: ...

    def loaded(self) -> LoadedModel | None: ...

    def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Stream the tokens of one request; the last event has done=True. Closing the iterator early
        (aclose, or a cancelled task) cancels the request and frees its engine slot within one step.
        With `output_format`, the generated text is constrained to it (an invalid schema raises
        RequestError before any token)."""
        ...

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per input: the mean of the final (normed) hidden states over its tokens, not
        normalised. All inputs run as one batch."""
        ...

    async def cluster(self) -> dict[str, Any]:
        """The group as it is now: {"world_size", "ranks": [{"rank", "host", "pid", "device",
        "rss_bytes", "mem_total_bytes", "mem_available_bytes", "device_mem_used_bytes",
        "device_mem_total_bytes", "alive"}], "as_of": unix seconds}. Answers from the last snapshot
        while a request holds the group."""
        ...

    async def close(self) -> None: ...
