"""Embeddings: POST /api/embed, the legacy POST /api/embeddings and OpenAI's POST /v1/embeddings.

Inputs are tokenized here with the model's special tokens, fitted to num_ctx, and sent to the engine
as one batch while the request holds the model through the scheduler, as a generation does. The
engine returns mean-pooled vectors; /api/embed and /v1/embeddings L2-normalise them (after cutting
them to `dimensions`), the legacy route returns them as they are, as upstream does.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.errors import ModelNotFound
from tp_ollama.server.ollama_routes import ClientGone, unless_disconnected
from tp_ollama.server.schemas import (
    ApiError,
    ResolvedModel,
    _field,
    _options,
    json_response,
    model_field,
    parse_keep_alive,
    read_json,
)
from tp_ollama.server.text_service import TextService

Rows = npt.NDArray[np.float64]  # (n_inputs, hidden)

# --- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedRequest:
    """/api/embed, and the other two routes mapped onto it."""

    model: str  # as sent: responses echo it
    texts: list[str]  # empty: just load the model
    truncate: bool = True
    dimensions: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None


def parse_embed(body: Mapping[str, Any]) -> EmbedRequest:
    model = model_field(body)
    value = body.get("input")
    if value is None:
        texts: list[str] = []
    elif isinstance(value, str):
        texts = [value] if value else []
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        texts = list(value)
    else:
        raise ApiError(400, "invalid input type")
    return EmbedRequest(
        model,
        texts,
        truncate=_field(body, "truncate", bool, True),
        dimensions=_dimensions(body),
        options=_options(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
    )


def parse_embeddings(body: Mapping[str, Any]) -> EmbedRequest:
    """The legacy route: one `prompt`."""
    prompt = _field(body, "prompt", str, "")
    return EmbedRequest(
        model_field(body),
        [prompt] if prompt else [],
        options=_options(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
    )


@dataclass(frozen=True)
class OpenAIEmbedRequest:
    model: str
    texts: list[str] | None  # either texts or token id lists
    token_ids: list[list[int]] | None
    dimensions: int | None
    base64: bool


OPENAI_INPUT = (
    "invalid input: expected a string, an array of strings, an array of token ids or an array of arrays of token ids"
)


def parse_openai_embeddings(body: Mapping[str, Any]) -> OpenAIEmbedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    model = model_field({"model": model})
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise ApiError(400, f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64'].")
    value = body.get("input")
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    if isinstance(value, str):
        texts = [value]  # "" too: an empty string is an input here, as upstream
    elif not isinstance(value, list) or not value:
        raise ApiError(400, "invalid input")
    elif all(isinstance(v, str) for v in value):
        texts = list(value)
    elif all(_is_id(v) for v in value):
        token_ids = [list(value)]
    elif all(isinstance(v, list) and v and all(_is_id(t) for t in v) for v in value):
        token_ids = [list(v) for v in value]
    else:
        raise ApiError(400, OPENAI_INPUT)
    return OpenAIEmbedRequest(model, texts, token_ids, _dimensions(body), fmt == "base64")


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dimensions(body: Mapping[str, Any]) -> int | None:
    dimensions: int | None = _field(body, "dimensions", int)
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, f"dimensions={dimensions} is out of range: expected 1 to the model's embedding length")
    return dimensions


# --- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    rows: Rows  # (n_inputs, hidden), not normalised
    prompt_tokens: int
    load_ns: int


def fit(inputs: list[list[int]], num_ctx: int, truncate: bool) -> list[list[int]]:
    """Each input cut to num_ctx tokens (truncate), or refused when longer (not truncate)."""
    fitted = []
    for i, ids in enumerate(inputs):
        if not ids:
            raise ApiError(400, f"input {i} is empty: it has no tokens to embed")
        if len(ids) > num_ctx:
            if not truncate:
                raise ApiError(
                    400,
                    f"the input length exceeds the context length: input {i} is {len(ids)} tokens and "
                    f"num_ctx is {num_ctx}; send truncate=true or raise num_ctx",
                )
            ids = ids[:num_ctx]
        fitted.append(ids)
    return fitted


async def embed(
    request: Request,
    service: TextService,
    request_name: str,
    resolved: ResolvedModel,
    inputs: list[list[int]],
    *,
    truncate: bool,
    options: Mapping[str, Any],
    keep_alive: float | None,
    started_ns: int,
) -> Embedded:
    """Hold the model, run all inputs as one engine batch, let go (a keep_alive 0 unload has happened
    by the time this returns)."""
    num_ctx = service.options(resolved.params, options).num_ctx
    inputs = fit(inputs, num_ctx, truncate)
    name = service.display_name(request_name, resolved)
    monitor = service.monitor
    track = monitor.queued(name, sum(len(ids) for ids in inputs), 0, started_ns)
    try:
        # A client that goes away while waiting for the model leaves the queue.
        lease = await unless_disconnected(request, service.scheduler.acquire(name, resolved, num_ctx, keep_alive))
    except ClientGone:
        monitor.cancelled(track)
        raise
    except Exception:
        monitor.failed(track)
        raise
    except BaseException:
        monitor.cancelled(track)
        raise
    monitor.running(track)
    # NOTE: the engine call is not cut short when the client leaves: a reply left unread on the
    # engine's socket would be taken for the next request's.
    try:
        vectors = await service.engine.embed(inputs)
    except Exception:
        monitor.failed(track)
        raise
    except BaseException:
        monitor.cancelled(track)
        raise
    finally:
        unload = lease.release()
        if unload is not None:
            await asyncio.wait([unload])
    rows = np.asarray(vectors, dtype=np.float64)
    if rows.shape[0] != len(inputs) or rows.ndim != 2:
        monitor.failed(track)
        raise ApiError(500, f"the engine returned {rows.shape[0]} vectors for {len(inputs)} inputs")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if bad.size:
        monitor.failed(track)
        raise ApiError(500, f"the embedding of input {int(bad[0])} holds NaN or infinite values")
    monitor.finished(track)
    return Embedded(rows, track.prompt_tokens, lease.load_ns)


def normalised(rows: Rows, dimensions: int | None, model: str) -> Rows:
    """Rows cut to `dimensions` values, then L2-normalised."""
    hidden = rows.shape[1]
    if dimensions is not None:
        if dimensions > hidden:
            raise ApiError(
                400,
                f"dimensions={dimensions} is out of range for {model}: expected 1 to {hidden} (its embedding length)",
            )
        rows = rows[:, :dimensions]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


async def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return await asyncio.to_thread(lambda: [tokenizer.encode(t, add_special_tokens=True) for t in texts])


# --- routes -------------------------------------------------------------------------------------------


def routes(service: TextService, max_body_bytes: int) -> list[Route]:
    async def api_embed(request: Request) -> Response:
        started = time.perf_counter_ns()
        req = parse_embed(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        if not req.texts:
            await unless_disconnected(request, service.load_only(req.model, resolved, req.options, req.keep_alive))
            return json_response({"model": req.model, "embeddings": []})
        ids = await _encode(await service.tokenizer(resolved.path), req.texts)
        out = await embed(
            request,
            service,
            req.model,
            resolved,
            ids,
            truncate=req.truncate,
            options=req.options,
            keep_alive=req.keep_alive,
            started_ns=started,
        )
        rows = normalised(out.rows, req.dimensions, req.model)
        return json_response(
            {
                "model": req.model,
                "embeddings": rows.tolist(),
                "total_duration": time.perf_counter_ns() - started,
                "load_duration": out.load_ns,
                "prompt_eval_count": out.prompt_tokens,
            }
        )

    async def api_embeddings(request: Request) -> Response:
        started = time.perf_counter_ns()
        req = parse_embeddings(await read_json(request, max_body_bytes))
        try:
            resolved = await service.resolve(req.model)
        except ModelNotFound:
            raise ApiError(404, f'model "{req.model}" not found, try pulling it first') from None
        if not req.texts:
            await unless_disconnected(request, service.load_only(req.model, resolved, req.options, req.keep_alive))
            return json_response({"embedding": []})
        ids = await _encode(await service.tokenizer(resolved.path), req.texts)
        out = await embed(
            request,
            service,
            req.model,
            resolved,
            ids,
            truncate=True,
            options=req.options,
            keep_alive=req.keep_alive,
            started_ns=started,
        )
        return json_response({"embedding": out.rows[0].tolist()})

    async def openai_embeddings(request: Request) -> Response:
        started = time.perf_counter_ns()
        req = parse_openai_embeddings(await read_json(request, max_body_bytes))
        resolved = await service.resolve(req.model)
        tokenizer = await service.tokenizer(resolved.path)
        if req.texts is not None:
            ids = await _encode(tokenizer, req.texts)
        else:
            assert req.token_ids is not None
            ids = req.token_ids
            bad = [t for row in ids for t in row if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(
                    400, f"input holds token ids outside the vocabulary (0..{tokenizer.vocab_size - 1}): {bad[:5]}"
                )
        out = await embed(
            request, service, req.model, resolved, ids, truncate=True, options={}, keep_alive=None, started_ns=started
        )
        rows = normalised(out.rows, req.dimensions, req.model)
        data = [
            {"object": "embedding", "embedding": _b64(row) if req.base64 else row.tolist(), "index": i}
            for i, row in enumerate(rows)
        ]
        use = {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}
        return json_response({"object": "list", "data": data, "model": req.model, "usage": use})

    return [
        Route("/api/embed", api_embed, methods=["POST"]),
        Route("/api/embeddings", api_embeddings, methods=["POST"]),
        Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
    ]


def _b64(row: Rows) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the row."""
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
