"""A reply read as it streams: generated text split into thinking, content and tool calls.

The thinking is split off first (it comes first in the reply); tool calls are then looked for in the
content. `ReplyParser` is the reader that the text pipeline (text/pipeline.py) hands the text to; its
`markers` are the tags it looks for, which the pipeline's detokenizer writes out even where the
vocabulary holds them as special tokens (`[TOOL_CALLS]`, `<|python_tag|>`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tp_ollama.text import thinking, tool_calls
from tp_ollama.text.thinking import ThinkingParser
from tp_ollama.text.tool_calls import ToolCall, ToolCallParser


@dataclass(frozen=True)
class ReplyFormat:
    """How to read one reply. `thinking`: split `<think>...</think>` off; `thinking_open`: the prompt
    ends in `<think>`, so the reply starts inside the reasoning; `tools`: the names of the request's
    tools, None when it gave none (no tool-call parsing)."""

    thinking: bool = False
    thinking_open: bool = False
    tools: frozenset[str] | None = None

    def markers(self) -> tuple[str, ...]:
        return (*(thinking.MARKERS if self.thinking else ()), *(tool_calls.MARKERS if self.tools is not None else ()))


@dataclass(frozen=True)
class Piece:
    """A part of a reply: text deltas and the tool calls completed in it."""

    content: str = ""
    thinking: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls)

    @staticmethod
    def join(pieces: Iterable[Piece]) -> Piece:
        """The whole reply, for stream:false."""
        parts = list(pieces)
        return Piece(
            "".join(p.content for p in parts),
            "".join(p.thinking for p in parts),
            tuple(c for p in parts for c in p.tool_calls),
        )


class ReplyParser:
    """`push(text)` -> the Piece that `text` completes (often empty while a tag or a call is still
    open); `flush()` -> what is left at the end of the reply; `finish(text)` -> the last text and
    what is left, as one Piece."""

    def __init__(self, fmt: ReplyFormat) -> None:
        self.markers = fmt.markers()
        self._thinking = ThinkingParser(fmt.thinking_open) if fmt.thinking else None
        self._tools = ToolCallParser(fmt.tools) if fmt.tools is not None else None

    def push(self, text: str) -> Piece:
        reasoning, content = self._thinking.push(text) if self._thinking else ("", text)
        return self._content(reasoning, content, final=False)

    def flush(self) -> Piece:
        reasoning, content = self._thinking.flush() if self._thinking else ("", "")
        return self._content(reasoning, content, final=True)

    def finish(self, text: str) -> Piece:
        return Piece.join([self.push(text), self.flush()])

    def _content(self, reasoning: str, content: str, final: bool) -> Piece:
        if self._tools is None:
            return Piece(content, reasoning)
        text, calls = self._tools.push(content)
        if final:
            tail, more = self._tools.flush()
            text, calls = text + tail, calls + more
        return Piece(text, reasoning, tuple(calls))
