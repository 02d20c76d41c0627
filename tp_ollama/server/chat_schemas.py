"""Wire formats of chat beyond plain text: messages with reasoning, tool calls and tool results; the
request's `tools` and `think` (OpenAI: `reasoning_effort`); and tool calls as each API writes them.
Split from schemas.py, which builds the requests and response chunks with these.

Whether a model supports tools or thinking is decided where the model is known (server/prompts.py);
here only the values are checked."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tp_ollama.server.fields import ApiError, json_field, json_kind
from tp_ollama.text.tool_calls import ToolCall

ROLES = ("system", "user", "assistant", "tool")
THINK_LEVELS = ("low", "medium", "high", "max")

# `think`: absent (None), true/false, or a level (which means true to a chat template).
Think = bool | str | None

# OpenAI's reasoning efforts -> think (upstream's mapping).
_EFFORTS: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_name: str | None = None  # role "tool": the tool whose result this is
    thinking: str = ""  # an assistant's earlier reasoning
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's earlier calls
    tool_call_id: str | None = None  # role "tool": the call this answers

    def for_template(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates read it: a tool result names its tool under
        `name`; calls are {"type": "function", "function": {"name", "arguments": object}}."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            message["thinking"] = self.thinking  # the renderer also offers it as reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [_template_call(c) for c in self.tool_calls]
        if self.tool_name:
            message["name"] = self.tool_name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def _template_call(call: ToolCall) -> dict[str, Any]:
    shaped = {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {"id": call.id, **shaped} if call.id else shaped


# --- in ---------------------------------------------------------------------------------------------


def _role(value: Mapping[str, Any], aliases: Mapping[str, str] | None = None) -> str:
    role = json_field(value, "role", str, "").lower()
    role = (aliases or {}).get(role, role)
    if role not in ROLES:
        raise ApiError(400, f"message role {role!r} is invalid: expected one of {', '.join(ROLES)}")
    return role


def parse_message(model: str, value: object) -> ChatMessage:
    """One /api/chat message."""
    if not isinstance(value, dict):
        raise ApiError(400, f"each message must be an object with role and content, got {json_kind(value)}")
    role = _role(value)
    if json_field(value, "images", list):
        raise ApiError(400, f'"{model}" does not support images (text-only model)')
    return ChatMessage(
        role,
        json_field(value, "content", str, ""),
        tool_name=json_field(value, "tool_name", str),
        thinking=json_field(value, "thinking", str, ""),
        tool_calls=_history_calls(value),
        tool_call_id=json_field(value, "tool_call_id", str),
    )


def _history_calls(message: Mapping[str, Any]) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls`, native (arguments an object) or OpenAI (a JSON string)."""
    calls = []
    for i, value in enumerate(json_field(message, "tool_calls", list, [])):
        function = value.get("function") if isinstance(value, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, "each tool call must be an object with a function that has a name")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ApiError(400, "invalid tool call arguments") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ApiError(400, "invalid tool call arguments")
        index = json_field(function, "index", int, json_field(value, "index", int, i))
        calls.append(ToolCall(function["name"], arguments, index, json_field(value, "id", str, "")))
    return tuple(calls)


def name_tool_results(messages: Iterable[ChatMessage]) -> tuple[ChatMessage, ...]:
    """Tool results that give only `tool_call_id` get the name of the call it points to (upstream)."""
    names: dict[str, str] = {}
    named = []
    for message in messages:
        names.update({c.id: c.name for c in message.tool_calls if c.id})
        if message.role == "tool" and not message.tool_name and message.tool_call_id in names:
            message = replace(message, tool_name=names[message.tool_call_id])
        named.append(message)
    return tuple(named)


def parse_tools(body: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """`tools`: [{"type": "function", "function": {"name", "description"?, "parameters"?}}], handed to
    the chat template as they are. Absent or [] gives ()."""
    tools = []
    for tool in json_field(body, "tools", list, []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ApiError(400, 'each tool must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, "each tool's function needs a name")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"the parameters of tool {function['name']!r} must be a JSON Schema object")
        tools.append({**tool, "type": "function"})
    return tuple(tools)


def parse_think(body: Mapping[str, Any]) -> Think:
    think = body.get("think")
    if think is None or isinstance(think, bool) or (isinstance(think, str) and think in THINK_LEVELS):
        return think
    raise ApiError(
        400, f'invalid think value: {json.dumps(think)} (must be "high", "medium", "low", "max", true, or false)'
    )


def openai_think(body: Mapping[str, Any]) -> Think:
    """`reasoning_effort` or `reasoning.effort` -> think."""
    effort = body.get("reasoning_effort")
    if effort is None:
        effort = json_field(body, "reasoning", dict, {}).get("effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in _EFFORTS:
        choices = ", ".join(f'"{e}"' for e in _EFFORTS)
        raise ApiError(400, f"invalid reasoning value: {json.dumps(effort)} (must be one of {choices})")
    return _EFFORTS[effort]


def openai_messages(model: str, values: Sequence[object]) -> tuple[ChatMessage, ...]:
    return name_tool_results(m for value in values for m in _openai_message(model, value))


def _openai_message(model: str, value: object) -> list[ChatMessage]:
    """One OpenAI message -> native messages: each content part becomes its own message, and the
    calls and reasoning go on the last of them (upstream)."""
    if not isinstance(value, dict):
        raise ApiError(400, f"each message must be an object with role and content, got {json_kind(value)}")
    role = _role(value, {"developer": "system"})
    tool_name = json_field(value, "name", str) if role == "tool" else None
    tool_call_id = json_field(value, "tool_call_id", str) if role == "tool" else None
    content = value.get("content")
    if content is None or isinstance(content, str):
        texts = [content or ""]
    elif isinstance(content, list):
        texts = [_text_part(model, part) for part in content] or [""]
    else:
        raise ApiError(400, f"invalid message content type: {json_kind(content)}")
    messages = [ChatMessage(role, text, tool_name, tool_call_id=tool_call_id) for text in texts]
    reasoning = json_field(value, "reasoning", str) or json_field(value, "reasoning_content", str, "")
    messages[-1] = replace(messages[-1], thinking=reasoning, tool_calls=_history_calls(value))
    return messages


def _text_part(model: str, part: object) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image_url":
        raise ApiError(400, f'"{model}" does not support images (text-only model)')
    if kind != "text" or not isinstance(part, dict):
        raise ApiError(400, f"invalid message part type: {kind!r}")
    text: str = json_field(part, "text", str, "")
    return text


# --- out --------------------------------------------------------------------------------------------


def ollama_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """/api/chat `message.tool_calls`: arguments stay a JSON object."""
    return [{"id": c.id, "function": {"index": c.index, "name": c.name, "arguments": c.arguments}} for c in calls]


def openai_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` (message or delta): arguments as a JSON string, `index` for stream deltas."""
    return [
        {
            "id": c.id,
            "index": c.index,
            "type": "function",
            "function": {
                "name": c.name,
                "arguments": json.dumps(c.arguments, separators=(",", ":"), ensure_ascii=False),
            },
        }
        for c in calls
    ]
