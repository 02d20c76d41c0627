"""Tool calls in generated text, found while the text streams.

The formats chat templates teach models:

* Qwen / Hermes: `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, several in a row, with
  text around them;
* Mistral: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]f[ARGS]{...}`;
* Llama 3.1: `<|python_tag|>{"name": "f", "parameters": {...}}`, or the same JSON object (or an array
  of them) with nothing else around it but whitespace.

`ToolCallParser.push(text)` returns the text that can no longer be part of a call (content) and the
calls completed so far. Text is held back while it may still be the start of a call: a prefix of a
marker, or (at the very start of the reply) whitespace and a JSON value not yet closed. JSON is judged
by `json.JSONDecoder.raw_decode`; `_JsonSpan` only finds where a value closes. Text that looks like a
call but does not parse as one is given back as content, unchanged.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
PYTHON_TAG = "<|python_tag|>"
# Markers that start a call; and every marker text, which the detokenizer must write out even where
# the vocabulary has it as a special token (Mistral's and Llama's are).
_OPENERS = (TOOL_CALL_OPEN, MISTRAL_CALLS, PYTHON_TAG)
MARKERS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, MISTRAL_CALLS, MISTRAL_ARGS, PYTHON_TAG)

_ID_ALPHABET = string.ascii_lowercase + string.digits
_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    """`call_` and 8 random lowercase letters and digits, as upstream Ollama makes them."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class ToolCall:
    """One call: `index` is its place among the reply's calls; `arguments` keeps the model's key order."""

    name: str
    arguments: dict[str, Any]
    index: int = 0
    id: str = field(default_factory=new_call_id)


class _JsonSpan:
    """Where a JSON object or array that starts at text[0] closes, fed a growing text: it follows
    strings and nesting, nothing else, so it works on any prefix in one pass overall."""

    def __init__(self) -> None:
        self._pos = 0
        self._closers: list[str] = []
        self._in_string = False
        self._escaped = False
        self.broken = False  # a bracket closed that was not open: this is not JSON
        self._end: int | None = None

    def end(self, text: str) -> int | None:
        """The index just past the closed value (or past the bracket that broke it); None while open."""
        if self._end is not None:
            return self._end
        for i in range(self._pos, len(text)):
            c = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._closers.append("}" if c == "{" else "]")
            elif c in "}]":
                if not self._closers or self._closers.pop() != c:
                    self.broken = True
                if self.broken or not self._closers:
                    self._end = i + 1
                    return self._end
        self._pos = len(text)
        return None


def _could_hold_calls(text: str) -> bool:
    """False once `text` (starting with `{` or `[`) cannot be a call object or a list of them: an object
    starts with a key or ends at once, a list with an object."""
    rest = text[1:].lstrip()
    if not rest:
        return True
    return rest[0] in ('"}' if text[0] == "{" else "{]")


# Parser states: nothing emitted yet (a bare JSON call is still possible); ordinary text; inside
# <tool_call>...</tool_call>; after [TOOL_CALLS] or <|python_tag|>, reading the JSON that follows.
_START, _TEXT, _TAGGED, _AFTER_MARKER = "start", "text", "tagged", "after-marker"


class ToolCallParser:
    """Finds tool calls in a reply fed piece by piece. `tool_names`: the request's tools; a bare JSON
    object is only taken for a call of one of them (when given), since plain answers can be JSON."""

    def __init__(self, tool_names: Collection[str] = ()) -> None:
        self._names = frozenset(tool_names)
        self._state = _START
        self._buf = ""  # text received and not yet given back as content or calls
        self._gap = ""  # whitespace dropped before a marker, given back if the call does not parse
        self._marker = ""  # the marker that opened the current call
        self._name: str | None = None  # Mistral's `[TOOL_CALLS]name[ARGS]` form: the name, once read
        self._span = _JsonSpan()
        self._after_call = False  # whitespace right after a call is dropped...
        self._sep = ""  # ...except one run of it between content before and after calls
        self._emitted = False  # some content has been given back
        self._searched = 0  # in _TAGGED: the closing tag is not in buf[:searched]
        self._count = 0

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) that `text` completes."""
        self._buf += text
        return self._run(final=False)

    def flush(self) -> tuple[str, list[ToolCall]]:
        """(content, calls) left at the end of the reply: an unfinished call is content unless what it
        holds already parses (a model may end without the closing tag)."""
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, list[ToolCall]]:
        steps = {_START: self._start, _TEXT: self._text, _TAGGED: self._tagged, _AFTER_MARKER: self._after}
        content: list[str] = []
        calls: list[ToolCall] = []
        # At the end an open marker is settled even with nothing after it.
        while self._buf or (final and self._state in (_TAGGED, _AFTER_MARKER)):
            result = steps[self._state](final)
            if result is None:
                break
            text, found = result
            if text:
                text, self._sep, self._emitted = self._sep + text, "", True
            content.append(text)
            calls.extend(found)
        return "".join(content), calls

    # --- states: each consumes a prefix of buf and returns (content, calls), or None to wait ---------

    def _start(self, final: bool) -> tuple[str, list[ToolCall]] | None:
        value = self._buf.lstrip()
        if not value and not final:
            return None
        if not value or value[0] not in "{[":
            self._state = _TEXT
            return "", []
        end = self._span.end(value)
        if self._span.broken or not _could_hold_calls(value) or (end is None and final):
            self._state = _TEXT
            return "", []
        if end is None:
            return None
        lead = len(self._buf) - len(value)
        if value[end:].strip():  # something follows the JSON: not a reply made of calls
            self._state = _TEXT
            text, self._buf = self._buf[: lead + end], self._buf[lead + end :]
            return text, []
        if not final:
            return None
        calls = self._calls(value[:end], bare=True)
        if calls is None:
            self._state = _TEXT
            return "", []
        self._buf = ""
        return "", calls

    def _text(self, final: bool) -> tuple[str, list[ToolCall]] | None:
        if self._after_call:
            text = self._buf.lstrip()
            if self._emitted and not self._sep:
                self._sep = self._buf[: len(self._buf) - len(text)]
            self._buf = text
            if not text:
                return None
            self._after_call = False
        found = [(i, m) for m in _OPENERS if (i := self._buf.find(m)) >= 0]
        if found:
            at, marker = min(found)
            before = self._buf[:at]
            text = before.rstrip()
            self._gap = before[len(text) :]
            self._marker, self._name, self._span, self._searched = marker, None, _JsonSpan(), 0
            self._state = _TAGGED if marker == TOOL_CALL_OPEN else _AFTER_MARKER
            self._buf = self._buf[at + len(marker) :]
            return text, []
        if final:
            text, self._buf = self._buf, ""
            return text, []
        held = _partial_marker(self._buf)
        text = self._buf[: len(self._buf) - held].rstrip()  # trailing whitespace waits: a call may follow
        if not text:
            return None
        self._buf = self._buf[len(text) :]
        return text, []

    def _tagged(self, final: bool) -> tuple[str, list[ToolCall]] | None:
        close = self._buf.find(TOOL_CALL_CLOSE, self._searched)
        if close < 0 and not final:
            self._searched = max(0, len(self._buf) - len(TOOL_CALL_CLOSE) + 1)
            return None
        body = self._buf if close < 0 else self._buf[:close]
        rest = "" if close < 0 else self._buf[close + len(TOOL_CALL_CLOSE) :]
        calls = self._calls(body.strip(), bare=False)
        if calls is None:
            original = self._gap + TOOL_CALL_OPEN + body + ("" if close < 0 else TOOL_CALL_CLOSE)
            return self._resume(original, [], rest)
        return self._resume("", calls, rest)

    def _after(self, final: bool) -> tuple[str, list[ToolCall]] | None:
        value = self._buf.lstrip()
        if not value:
            return self._fail(self._buf, "") if final else None
        if value[0] not in "{[":
            if self._name is not None or self._marker != MISTRAL_CALLS:
                return self._fail("", self._buf)
            return self._mistral_name(value, final)
        end = self._span.end(value)
        if end is None and not final:
            return None
        end = len(value) if end is None else end
        lead = len(self._buf) - len(value)
        text, rest = self._buf[: lead + end], value[end:]
        if self._name is None:
            calls = self._calls(value[:end], bare=False, need_arguments=self._marker == PYTHON_TAG)
        else:
            arguments = _object(value[:end])
            calls = None if arguments is None else self._calls_of([{"name": self._name, "arguments": arguments}])
        return self._fail(text, rest) if calls is None else self._resume("", calls, rest)

    def _mistral_name(self, value: str, final: bool) -> tuple[str, list[ToolCall]] | None:
        """`[TOOL_CALLS]name[ARGS]{...}`: read the name, then the arguments object as above."""
        args = value.find(MISTRAL_ARGS)
        if args < 0:
            if final or not _partial_name(value):
                return self._fail("", self._buf)
            return None
        if not _partial_name(value[:args]):
            return self._fail("", self._buf)
        self._name, self._buf = value[:args], value[args + len(MISTRAL_ARGS) :]
        return "", []

    def _fail(self, text: str, rest: str) -> tuple[str, list[ToolCall]]:
        """What followed a marker is no call: the marker and `text` are content again."""
        name = "" if self._name is None else self._name + MISTRAL_ARGS
        return self._resume(self._gap + self._marker + name + text, [], rest)

    def _resume(self, content: str, calls: list[ToolCall], rest: str) -> tuple[str, list[ToolCall]]:
        """Back to ordinary text with `rest` after a call (or a failed one)."""
        if calls and self._emitted and not self._sep:
            self._sep = self._gap
        self._state, self._buf, self._gap = _TEXT, rest, ""
        self._after_call = bool(calls)
        return content, calls

    # --- JSON -> calls -------------------------------------------------------------------------------

    def _calls(self, text: str, bare: bool, need_arguments: bool = False) -> list[ToolCall] | None:
        """The calls `text` holds as a whole (one call object or a list of them), or None. A bare call
        must carry its arguments and name one of the request's tools."""
        try:
            value, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError:
            return None
        if text[end:].strip():
            return None
        items = value if isinstance(value, list) else [value]
        calls = self._calls_of(items, need_arguments=bare or need_arguments)
        if calls is not None and bare and self._names and any(c.name not in self._names for c in calls):
            return None
        return calls

    def _calls_of(self, items: list[Any], need_arguments: bool = False) -> list[ToolCall] | None:
        parsed = [_call(item, need_arguments) for item in items]
        calls = [ToolCall(c[0], c[1], index=self._count + i) for i, c in enumerate(parsed) if c is not None]
        if not calls or len(calls) < len(parsed):
            return None
        self._count += len(calls)
        return calls


def _call(item: object, need_arguments: bool) -> tuple[str, dict[str, Any]] | None:
    """One call object: {"name", "arguments" | "parameters"}, possibly wrapped as {"function": {...}}."""
    if not isinstance(item, dict):
        return None
    function = item.get("function")
    if isinstance(function, dict):  # {"type": "function", "function": {...}}
        item = function
    name = item.get("name")
    key = "arguments" if "arguments" in item else "parameters"
    if not isinstance(name, str) or not name or (need_arguments and key not in item):
        return None
    arguments = item.get(key, {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _object(arguments)
    if not isinstance(arguments, dict):
        return None
    return name, arguments


def _object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _partial_marker(text: str) -> int:
    """The length of the longest end of `text` that a marker starts with (0 if none): held back."""
    for n in range(min(len(text), max(map(len, _OPENERS)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in _OPENERS):
            return n
    return 0


def _partial_name(text: str) -> bool:
    """A function name being written (Mistral's `[TOOL_CALLS]name[ARGS]`), or the start of `[ARGS]`."""
    head = text.split("[", 1)[0]
    return bool(head) and all(c.isalnum() or c in "_-." for c in head) and MISTRAL_ARGS.startswith(text[len(head) :])
