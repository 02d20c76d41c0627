"""Wire formats: request bodies parsed and checked into plain dataclasses, and the response objects
(Ollama NDJSON chunks, OpenAI objects and SSE chunks, error bodies) built from plain values.

Nothing here touches an engine or a tokenizer; handlers parse with these, call the text layer
(`server/text_service.py`) and serialize with these.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tp_ollama.engine.constraint import grammar_for
from tp_ollama.engine.protocol import OutputFormat
from tp_ollama.errors import RequestError
from tp_ollama.server.chat_schemas import (
    ChatMessage,
    Think,
    name_tool_results,
    ollama_tool_calls,
    parse_message,
    parse_think,
    parse_tools,
)
from tp_ollama.server.fields import ApiError
from tp_ollama.server.fields import json_field as _field
from tp_ollama.server.fields import json_kind as _kind
from tp_ollama.text.tool_calls import ToolCall

NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
SSE = "text/event-stream"


# --- what the front end needs to know about a model ------------------------------------------------


class ModelDetails(Protocol):
    def to_dict(self) -> dict[str, Any]:
        """/api/tags `details`: parent_model, format, family, families, parameter_size, quantization_level."""
        ...


class ResolvedModel(Protocol):
    """An installed model as the store describes it (tp_ollama.store.model_store.ResolvedModel has this shape).

    `template` is the model's Ollama TEMPLATE (Go text/template). It is NOT rendered yet: prompts are
    rendered with the tokenizer's Jinja chat template until Go templates are supported (a later issue).
    `params` holds Modelfile PARAMETERs (`{"stop": [...], "temperature": 0.6}`), `messages` its MESSAGEs.
    """

    @property
    def name(self) -> str: ...  # display name: `smollm2:135m`
    @property
    def path(self) -> Path: ...  # a GGUF file or an HF directory
    @property
    def files(self) -> Sequence[tuple[str, str, int]]: ...  # (name in an HF directory or "", digest, size)
    @property
    def template(self) -> str | None: ...
    @property
    def system(self) -> str | None: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def messages(self) -> Sequence[Mapping[str, Any]]: ...
    @property
    def digest(self) -> str: ...  # 64 hex characters, "" when unknown
    @property
    def details(self) -> ModelDetails: ...
    @property
    def modified_at(self) -> datetime: ...


class ModelResolver(Protocol):
    def resolve(self, name: str) -> ResolvedModel:
        """The installed model called `name` (any accepted spelling); raises ModelNotFound."""
        ...

    def names(self) -> list[str]:
        """Display names of the installed models, for /v1/models."""
        ...


# --- JSON in ------------------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON in request body: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_kind(value)}")
    return value


_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
_NAME = re.compile(
    rf"^(?:[A-Za-z0-9_][A-Za-z0-9_.:-]{{0,349}}/)?(?:[A-Za-z0-9_][A-Za-z0-9_-]{{0,79}}/)?{_PART}(?::{_PART})?$"
)


def model_field(body: Mapping[str, Any]) -> str:
    """`model` (or legacy `name`), checked against Ollama's name grammar: never a filesystem path."""
    name = _field(body, "model", str) or _field(body, "name", str)
    if not name:
        raise ApiError(400, "model is required")
    if not _NAME.match(name.split("@", 1)[0]):
        raise ApiError(400, "invalid model name")
    return str(name)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: object) -> float | None:
    """Seconds (negative: forever), from a number of seconds or a Go duration (`5m`, `1h30m`, `0`).
    A unitless string (`"-1"`) is taken as seconds. None when absent."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ApiError(400, f"invalid keep_alive {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ApiError(400, f"field 'keep_alive' must be a number or a duration string, got {_kind(value)}")
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:
        return sign * float(body)
    except ValueError:
        pass
    pos, seconds = 0, 0.0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise ApiError(400, f'time: invalid duration "{value}"')
    return sign * seconds


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(_field(body, "options", dict, {}))
    stop = options.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise ApiError(400, f"option stop={stop!r} is invalid: expected a string or an array of strings")
    return options


def parse_format(value: object) -> OutputFormat | None:
    """`format`: "json", a JSON Schema object, or absent / "" for free text. A schema is checked here
    (compiled to a grammar, about a millisecond) so that a bad one is a 400 before anything streams."""
    if value in (None, ""):
        return None
    if value == "json":
        return OutputFormat("json")
    if not isinstance(value, dict):
        raise ApiError(400, f'invalid format: {json.dumps(value)}; expected "json" or a valid JSON Schema object')
    try:
        grammar_for("schema", value)
    except RequestError as e:
        raise ApiError(400, str(e)) from None
    return OutputFormat("schema", value)


def parse_response_format(value: object) -> OutputFormat | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(value, dict) or kind not in ("text", "json_object", "json_schema"):
        raise ApiError(
            400,
            f"invalid response_format: {json.dumps(value)}; expected an object whose type is "
            '"text", "json_object" or "json_schema"',
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, "response_format json_schema needs json_schema.schema, a JSON Schema object")
    return parse_format(spec["schema"])


def _common_checks(body: Mapping[str, Any], model: str) -> None:
    """Features no model supports here yet: refused with Ollama's wording rather than ignored."""
    top = _field(body, "top_logprobs", int, 0)
    if not 0 <= top <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")
    if _field(body, "logprobs", bool, False) or top:
        raise ApiError(400, "logprobs are not supported yet")


# --- native requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    model: str  # as sent: responses echo it verbatim
    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    context: tuple[int, ...] | None = None
    raw: bool = False
    stream: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None  # seconds; None: the server default; negative: forever
    format: OutputFormat | None = None  # structured output
    think: Think = None  # whether the model may support it is checked where the model is known


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...] = ()
    stream: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None
    format: OutputFormat | None = None
    tools: tuple[dict[str, Any], ...] = ()  # handed to the chat template as they are
    think: Think = None


def parse_generate(body: Mapping[str, Any]) -> GenerateRequest:
    model = model_field(body)
    _common_checks(body, model)
    if _field(body, "images", list):
        raise ApiError(400, f'"{model}" does not support images (text-only model)')
    template = _field(body, "template", str, "")
    raw = _field(body, "raw", bool, False)
    system = _field(body, "system", str)
    context = _field(body, "context", list)
    if raw and (template or system or context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    if template:
        # NOTE: Ollama's `template` is a Go text/template; rendering one is a later issue, and a
        # template we cannot render must not silently produce a different prompt.
        raise ApiError(400, "the template field is not supported yet; omit it to use the model's chat template")
    if context is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise ApiError(400, "field 'context' must be an array of token ids (integers)")
    suffix = _field(body, "suffix", str, "")
    if suffix:
        raise ApiError(400, f'"{model}" does not support insert')
    return GenerateRequest(
        model=model,
        prompt=_field(body, "prompt", str, ""),
        suffix=suffix,
        system=system,
        context=tuple(context) if context else None,
        raw=raw,
        stream=_field(body, "stream", bool, True),
        options=_options(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        format=parse_format(body.get("format")),
        think=parse_think(body),
    )


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    model = model_field(body)
    _common_checks(body, model)
    return ChatRequest(
        model=model,
        messages=name_tool_results(parse_message(model, m) for m in _field(body, "messages", list, [])),
        stream=_field(body, "stream", bool, True),
        options=_options(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
        format=parse_format(body.get("format")),
        tools=parse_tools(body),
        think=parse_think(body),
    )


# --- JSON out -------------------------------------------------------------------------------------


def dumps(value: object) -> str:
    """Compact like Go's encoding/json: no spaces, UTF-8 kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def ndjson_line(value: object) -> bytes:
    return (dumps(value) + "\n").encode()


def sse_event(value: object) -> bytes:
    return f"data: {dumps(value)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def json_response(value: object, status: int = 200) -> Response:
    return Response(dumps(value), status_code=status, media_type=JSON)


def ollama_error(message: str) -> dict[str, Any]:
    return {"error": message}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def created_at(now: float | None = None) -> str:
    """RFC 3339 in UTC with fractional seconds: 2024-09-12T21:17:29.110811Z."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Metrics:
    """Final-chunk counts and nanosecond durations (Ollama's names)."""

    done_reason: str
    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int

    def fields(self) -> dict[str, Any]:
        return {
            "done_reason": self.done_reason,
            "total_duration": self.total_duration,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": self.eval_count,
            "eval_duration": self.eval_duration,
        }


def generate_chunk(
    model: str, text: str, metrics: Metrics | None = None, context: list[int] | None = None, thinking: str = ""
) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": model, "created_at": created_at(), "response": text}
    if thinking:
        chunk["thinking"] = thinking
    chunk["done"] = metrics is not None
    if metrics is not None:
        chunk.update(done_reason=metrics.done_reason)
        if context is not None:
            chunk["context"] = context
        chunk.update(metrics.fields())
    return chunk


def chat_chunk(
    model: str,
    text: str,
    metrics: Metrics | None = None,
    thinking: str = "",
    tool_calls: Sequence[ToolCall] = (),
) -> dict[str, Any]:
    """A /api/chat chunk; `message.thinking` and `message.tool_calls` only when there are some."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = ollama_tool_calls(tool_calls)
    chunk: dict[str, Any] = {
        "model": model,
        "created_at": created_at(),
        "message": message,
        "done": metrics is not None,
    }
    if metrics is not None:
        chunk.update(metrics.fields())
    return chunk


def load_reply(model: str, reason: str, chat: bool) -> dict[str, Any]:
    """The one object an empty prompt gets: done_reason "load" or "unload"."""
    reply: dict[str, Any] = {"model": model, "created_at": created_at()}
    if chat:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    reply.update(done=True, done_reason=reason)
    return reply


_FOREVER_S = 290 * 365.25 * 86400  # upstream reports keep_alive < 0 as about 290 years ahead


def ps_model(
    name: str,
    size: int,
    size_vram: int,
    digest: str,
    details: Mapping[str, Any],
    expires: float | None,
    num_ctx: int,
    precision: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One /api/ps entry; `expires` in unix seconds, None for never. `precision` (ours, beside
    Ollama's fields): what the engine runs, {"dtype": "float32", "weights": {"int4": 27, ...}}, where
    details.quantization_level is the file's."""
    entry = {
        "name": name,
        "model": name,
        "size": size,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "",
            "family": "",
            "families": [],
            "parameter_size": "",
            "quantization_level": "",
            **details,
        },
        "expires_at": created_at(time.time() + _FOREVER_S if expires is None else expires),
        "size_vram": size_vram,
        "context_length": num_ctx,
    }
    if precision:
        entry["precision"] = dict(precision)
    return entry


# --- streaming responses --------------------------------------------------------------------------


class StreamResponse(StreamingResponse):
    """StreamingResponse that always calls `on_close` once the response is over, whether the body ran
    to the end, was cancelled by a client disconnect, or never started (the send of the headers
    failed): whatever the request holds (an engine lease) is given back in every case. `on_close`
    must not block: it may run while the request is being cancelled."""

    def __init__(self, content: AsyncIterator[bytes], media_type: str, on_close: Callable[[], object]) -> None:
        super().__init__(content, media_type=media_type)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._content, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                self._on_close()


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over `limit` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, more than the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return parse_body(b"".join(chunks))
