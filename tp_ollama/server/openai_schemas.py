"""OpenAI's wire formats: /v1 request bodies translated to native requests, and the chat.completion,
chunk, completion and model objects sent back (a JSON string for tool-call arguments, `reasoning`
for thinking, as upstream's compatibility layer writes them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tp_ollama.server.chat_schemas import openai_messages, openai_think, openai_tool_calls, parse_tools
from tp_ollama.server.fields import ApiError
from tp_ollama.server.fields import json_field as _field
from tp_ollama.server.schemas import ChatRequest, GenerateRequest, model_field, parse_response_format
from tp_ollama.text.tool_calls import ToolCall

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


def parse_openai_chat(body: Mapping[str, Any]) -> tuple[ChatRequest, bool]:
    """(native chat request, include_usage)."""
    model = _openai_model(body)
    raw_messages = _field(body, "messages", list, [])
    if not raw_messages:
        raise ApiError(400, "[] is too short - 'messages'")
    output_format = parse_response_format(body.get("response_format"))
    if _field(body, "logprobs", bool, False):
        raise ApiError(400, "logprobs are not supported yet")
    stream, include_usage = _stream_flags(body)
    messages = openai_messages(model, raw_messages)
    request = ChatRequest(
        model,
        messages,
        stream,
        _openai_options(body),
        format=output_format,
        tools=parse_tools(body),
        think=openai_think(body),
    )
    return request, include_usage


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


def openai_chat_completion(
    ids: OpenAIIds,
    model: str,
    text: str,
    finish: str,
    use: dict[str, int],
    thinking: str = "",
    tool_calls: Sequence[ToolCall] = (),
) -> dict[str, Any]:
    """A whole chat.completion; the reasoning goes in `message.reasoning`, as upstream writes it."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["reasoning"] = thinking
    if tool_calls:
        message["tool_calls"] = openai_tool_calls(tool_calls)
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": use,
    }


def openai_chat_deltas(text: str, thinking: str = "", tool_calls: Sequence[ToolCall] = ()) -> list[dict[str, Any]]:
    """The stream deltas of one piece of a reply: reasoning, content and tool calls each get their own
    chunk (upstream splits a native chunk holding reasoning and content in two)."""
    deltas: list[dict[str, Any]] = []
    if thinking:
        deltas.append({"reasoning": thinking})
    if text:
        deltas.append({"content": text})
    if tool_calls:
        deltas.append({"tool_calls": openai_tool_calls(tool_calls)})
    return deltas


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
