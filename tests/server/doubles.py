"""Small honest test doubles for the HTTP front end's dependencies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tp_ollama.engine.options import GenerationOptions
from tp_ollama.engine.protocol import OutputFormat
from tp_ollama.errors import ModelNotFound, RequestError
from tp_ollama.server.engine_api import LoadedModel, LoadRequest, TokenEvent
from tp_ollama.store.embedded import EMBEDDED
from tp_ollama.store.names import normalize_name


@dataclass(frozen=True)
class Details:
    format: str = "gguf"
    family: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "family": self.family}


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    path: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    digest: str = ""
    details: Details = field(default_factory=Details)
    modified_at: datetime = datetime(2025, 1, 1, tzinfo=UTC)
    files: tuple[tuple[str, str, int], ...] = ()  # none: every rank reads `path`


class EmbeddedModels:
    """Test double for the model store: knows only the models embedded in tp-ollama (gemma3:270m,
    smollm2:135m, found by tp_ollama.store.embedded) and gives them no Modelfile layers (no TEMPLATE,
    SYSTEM, PARAMETER or MESSAGE). `extra` adds names backed by one of them with such layers."""

    def __init__(self, extra: dict[str, EmbeddedModel] | None = None) -> None:
        self.extra = extra or {}

    def resolve(self, name: str) -> EmbeddedModel:
        key = normalize_name(name).lower()
        if key in self.extra:
            return self.extra[key]
        if key not in EMBEDDED:
            raise ModelNotFound(name)
        path = EMBEDDED[key]()
        family = key.split(":")[0]
        return EmbeddedModel(key, path, details=Details("gguf", family))

    def names(self) -> list[str]:
        return sorted([*EMBEDDED, *self.extra])


class ScriptedEngine:
    """Test double for the engine: 'generates' a fixed list of token ids, then either ends (done_reason
    "stop") or raises `fail_with` -- for behaviour that a real model cannot be made to show on demand.
    It is a double that emits scripted token ids and nothing else: the server decodes them with the
    model's real tokenizer and reads them as it reads a real engine's tokens (thinking and tool calls
    included); script text with `tokenizer.encode(text, add_special_tokens=False)`. Each request's
    prompt ids are kept in `prompts`. With `hold`, a request waits in the engine (running, as far as
    the server can tell) until `release` is set; `release_from_thread()` sets it from a test thread
    while the server runs in its own."""

    def __init__(self, tokens: Sequence[int], fail_with: Exception | None = None) -> None:
        self.tokens = list(tokens)
        self.fail_with = fail_with
        self._loaded: LoadedModel | None = None
        self.loads: list[Path] = []
        self.unloaded = asyncio.Event()
        self.release = asyncio.Event()  # generate() waits for this before its first token when hold=True
        self.hold = False
        self.formats: list[OutputFormat | None] = []  # each request's output format, as received
        self.prompts: list[list[int]] = []  # each request's prompt ids, as received
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, once a request has run

    async def load(self, request: LoadRequest) -> LoadedModel:
        self.loads.append(request.path)
        self._loaded = LoadedModel(request.path, request.dtype, request.num_ctx, world_size=1, size_bytes=1234)
        self.unloaded.clear()
        return self._loaded

    async def unload(self) -> None:
        self._loaded = None
        self.unloaded.set()

    def loaded(self) -> LoadedModel | None:
        return self._loaded

    async def generate(
        self,
        prompt: list[int],
        options: GenerationOptions,
        eos_ids: frozenset[int],
        output_format: OutputFormat | None = None,
    ) -> AsyncIterator[TokenEvent]:
        self.formats.append(output_format)
        self.prompts.append(list(prompt))
        self._loop = asyncio.get_running_loop()
        if self._loaded is None:
            raise RequestError("no model is loaded")
        if self.hold:
            await self.release.wait()
        for token in self.tokens:
            yield TokenEvent(token)
        if self.fail_with is not None:
            raise self.fail_with
        n = len(self.tokens)
        yield TokenEvent(None, True, "stop", len(prompt), 1000, n, 2000)

    def release_from_thread(self) -> None:
        """Set `release` from a thread other than the server's event loop."""
        assert self._loop is not None, "no request has reached the engine yet"
        self._loop.call_soon_threadsafe(self.release.set)

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        # Not a model: a vector that depends only on the input, so routes can be checked for shape.
        return [[float(len(ids)), 1.0, float(sum(ids) % 7)] for ids in inputs]

    async def cluster(self) -> dict[str, Any]:
        rank = {"rank": 0, "host": "test-double", "pid": 0, "device": "cpu", "rss_bytes": 1,
                "mem_total_bytes": 2, "mem_available_bytes": 1, "device_mem_used_bytes": 0,
                "device_mem_total_bytes": 0, "alive": True}  # fmt: skip
        return {"world_size": 1, "ranks": [rank], "as_of": 0.0}

    async def close(self) -> None:
        await self.unload()
