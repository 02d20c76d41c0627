"""Wire formats: request bodies parsed and checked into plain dataclasses, and the response objects
(Ollama NDJSON chunks, OpenAI objects and SSE chunks, error bodies) built from plain values.

Nothing here touches an engine or a tokenizer; handlers parse with these, call the text layer
(`server/text.py`) and serialize with these.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
SSE = "text/event-stream"


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and the message clients show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- what the front end needs to know about a model ------------------------------------------------


class ModelDetails(Protocol):
    def to_dict(self) -> dict[str, Any]:
        """/api/tags `details`: parent_model, format, family, families, parameter_size, quantization_level."""
        ...


class ResolvedModel(Protocol):
    """An installed model as the store describes it (tp_ollama.store.registry.ResolvedModel has this shape).

    `template` is the model's Ollama TEMPLATE (Go text/template). It is NOT rendered yet: prompts are
    rendered with the tokenizer's Jinja chat template until Go templates are supported (a later issue).
    `params` holds Modelfile PARAMETERs (`{"stop": [...], "temperature": 0.6}`), `messages` its MESSAGEs.
    """

    @property
    def name(self) -> str: ...  # display name: `smollm2:135m`
    @property
    def path(self) -> Path: ...  # a GGUF file or an HF directory
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


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] checked against a JSON kind; absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        wanted = " or ".join(dict.fromkeys(_kind(k()) for k in kinds))
        raise ApiError(400, f"field {name!r} must be {wanted}, got {_kind(value)}")
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


def _common_checks(body: Mapping[str, Any], model: str) -> None:
    """Features no model supports here yet: refused with Ollama's wording rather than ignored."""
    fmt = body.get("format")
    if fmt not in (None, ""):
        if fmt == "json" or isinstance(fmt, dict):
            raise ApiError(400, "format (structured outputs) is not supported yet")
        raise ApiError(400, f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema object')
    think = body.get("think")
    if think is True or think in ("low", "medium", "high", "max"):
        raise ApiError(400, f'"{model}" does not support thinking')
    if think not in (None, False):
        raise ApiError(
            400,
            f'invalid think value: {json.dumps(think)} (must be "high", "medium", "low", "max", true, or false)',
        )
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


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_name: str | None = None

    def for_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_name:
            message["name"] = self.tool_name
        return message


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...] = ()
    stream: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None


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
    )


_ROLES = ("system", "user", "assistant", "tool")


def _message(model: str, value: object) -> ChatMessage:
    if not isinstance(value, dict):
        raise ApiError(400, f"each message must be an object with role and content, got {_kind(value)}")
    role = _field(value, "role", str, "").lower()
    if role not in _ROLES:
        raise ApiError(400, f"message role {role!r} is invalid: expected one of {', '.join(_ROLES)}")
    if _field(value, "images", list):
        raise ApiError(400, f'"{model}" does not support images (text-only model)')
    return ChatMessage(role, _field(value, "content", str, ""), _field(value, "tool_name", str))


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    model = model_field(body)
    _common_checks(body, model)
    if _field(body, "tools", list):
        raise ApiError(400, f'"{model}" does not support tools')
    return ChatRequest(
        model=model,
        messages=tuple(_message(model, m) for m in _field(body, "messages", list, [])),
        stream=_field(body, "stream", bool, True),
        options=_options(body),
        keep_alive=parse_keep_alive(body.get("keep_alive")),
    )


# --- OpenAI requests ------------------------------------------------------------------------------


def _openai_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI fields -> native options. temperature and top_p default to 1.0 (OpenAI's defaults),
    overriding the model's own parameters, as upstream does."""
    number = (int, float)
    options: dict[str, Any] = {
        "temperature": _field(body, "temperature", number, 1.0),
        "top_p": _field(body, "top_p", number, 1.0),
        "frequency_penalty": _field(body, "frequency_penalty", number, 0.0),
        "presence_penalty": _field(body, "presence_penalty", number, 0.0),
    }
    max_tokens = _field(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    seed = _field(body, "seed", int)
    if seed is not None:
        options["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "invalid type for 'stop' field: expected a string or an array of strings")
        options["stop"] = stop
    return options


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _field(body, "stream", bool, False)
    stream_options = _field(body, "stream_options", dict, {})
    return stream, bool(stream and _field(stream_options, "include_usage", bool, False))


def _openai_model(body: Mapping[str, Any]) -> str:
    model = _field(body, "model", str, "")
    if not model:
        raise ApiError(400, "model is required")
    return model_field({"model": model})


def _openai_messages(model: str, value: object) -> list[ChatMessage]:
    """One OpenAI message -> native messages: each content part becomes its own message (upstream)."""
    if not isinstance(value, dict):
        raise ApiError(400, f"each message must be an object with role and content, got {_kind(value)}")
    role = _field(value, "role", str, "").lower()
    if role == "developer":
        role = "system"
    if role not in _ROLES:
        raise ApiError(400, f"message role {role!r} is invalid: expected one of {', '.join(_ROLES)}")
    tool_name = _field(value, "name", str) if role == "tool" else None
    content = value.get("content")
    if content is None or isinstance(content, str):
        return [ChatMessage(role, content or "", tool_name)]
    if not isinstance(content, list):
        raise ApiError(400, f"invalid message content type: {_kind(content)}")
    messages = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            messages.append(ChatMessage(role, _field(part, "text", str, ""), tool_name))
        elif kind == "image_url":
            raise ApiError(400, f'"{model}" does not support images (text-only model)')
        else:
            raise ApiError(400, f"invalid message part type: {kind!r}")
    return messages


def parse_openai_chat(body: Mapping[str, Any]) -> tuple[ChatRequest, bool]:
    """(native chat request, include_usage)."""
    model = _openai_model(body)
    raw_messages = _field(body, "messages", list, [])
    if not raw_messages:
        raise ApiError(400, "[] is too short - 'messages'")
    response_format = _field(body, "response_format", dict, {})
    if response_format.get("type") not in (None, "text"):
        raise ApiError(400, "response_format (structured outputs) is not supported yet")
    effort = body.get("reasoning_effort") or _field(body, "reasoning", dict, {}).get("effort")
    if effort not in (None, "none"):
        raise ApiError(400, f'"{model}" does not support thinking')
    if _field(body, "tools", list):
        raise ApiError(400, f'"{model}" does not support tools')
    if _field(body, "logprobs", bool, False):
        raise ApiError(400, "logprobs are not supported yet")
    stream, include_usage = _stream_flags(body)
    messages = tuple(m for raw in raw_messages for m in _openai_messages(model, raw))
    return ChatRequest(model, messages, stream, _openai_options(body)), include_usage


def parse_openai_completion(body: Mapping[str, Any]) -> tuple[GenerateRequest, bool]:
    model = _openai_model(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "invalid prompt: only a single string is supported")
    if _field(body, "suffix", str, ""):
        raise ApiError(400, f'"{model}" does not support insert')
    if _field(body, "logprobs", int, 0):
        raise ApiError(400, "logprobs are not supported yet")
    stream, include_usage = _stream_flags(body)
    return GenerateRequest(model, prompt, stream=stream, options=_openai_options(body)), include_usage


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
    model: str, text: str, metrics: Metrics | None = None, context: list[int] | None = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": model, "created_at": created_at(), "response": text, "done": metrics is not None}
    if metrics is not None:
        chunk.update(done_reason=metrics.done_reason)
        if context is not None:
            chunk["context"] = context
        chunk.update(metrics.fields())
    return chunk


def chat_chunk(model: str, text: str, metrics: Metrics | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "model": model,
        "created_at": created_at(),
        "message": {"role": "assistant", "content": text},
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
    name: str, size: int, size_vram: int, digest: str, details: Mapping[str, Any], expires: float | None, num_ctx: int
) -> dict[str, Any]:
    """One /api/ps entry; `expires` in unix seconds, None for never."""
    return {
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


@dataclass(frozen=True)
class OpenAIIds:
    """id and created shared by every chunk of one response."""

    id: str
    created: int

    @classmethod
    def new(cls, prefix: str) -> OpenAIIds:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def openai_chat_completion(ids: OpenAIIds, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": use,
    }


def openai_chat_chunk(
    ids: OpenAIIds,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    use: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A delta chunk, the finish chunk (empty delta + finish_reason) or, with delta None, the usage chunk."""
    chunk: dict[str, Any] = {
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if use is not None:
        chunk["usage"] = use
    return chunk


def openai_completion(
    ids: OpenAIIds, model: str, text: str | None, finish: str | None, use: dict[str, int] | None = None
) -> dict[str, Any]:
    """A whole completion, a stream chunk, or (text None) the usage-only chunk."""
    body: dict[str, Any] = {
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [] if text is None else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        body["usage"] = use
    return body


def openai_model(name: str, created: int) -> dict[str, Any]:
    parts = name.split("/")
    return {"id": name, "object": "model", "created": created, "owned_by": parts[-2] if len(parts) > 1 else "library"}


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
