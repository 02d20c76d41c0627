"""A reply read as it streams: generated text split into thinking, content and tool calls.

The thinking is split off first (it comes first in the reply); tool calls are then looked for in the
content. Marker tokens that a vocabulary holds as special tokens (`[TOOL_CALLS]`, `<|python_tag|>`)
are written out by `ReplyDetokenizer`, since decoding drops special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.engine.detokenize import IncrementalDetokenizer
from tp_ollama.server import thinking, tool_calls
from tp_ollama.server.thinking import ThinkingParser
from tp_ollama.server.tool_calls import ToolCall, ToolCallParser


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
    open); `flush()` -> what is left at the end of the reply."""

    def __init__(self, fmt: ReplyFormat) -> None:
        self._thinking = ThinkingParser(fmt.thinking_open) if fmt.thinking else None
        self._tools = ToolCallParser(fmt.tools) if fmt.tools is not None else None

    def push(self, text: str) -> Piece:
        reasoning, content = self._thinking.push(text) if self._thinking else ("", text)
        return self._content(reasoning, content, final=False)

    def flush(self) -> Piece:
        reasoning, content = self._thinking.flush() if self._thinking else ("", "")
        return self._content(reasoning, content, final=True)

    def _content(self, reasoning: str, content: str, final: bool) -> Piece:
        if self._tools is None:
            return Piece(content, reasoning)
        text, calls = self._tools.push(content)
        if final:
            tail, more = self._tools.flush()
            text, calls = text + tail, calls + more
        return Piece(text, reasoning, tuple(calls))


class ReplyDetokenizer:
    """IncrementalDetokenizer that writes out the special tokens among `markers` instead of dropping
    them; every other special token is dropped as before."""

    def __init__(self, tokenizer: Tokenizer, markers: Iterable[str]) -> None:
        self._inner = IncrementalDetokenizer(tokenizer)
        ids = {m: tokenizer.token_to_id(m) for m in markers}
        self._kept = {i: m for m, i in ids.items() if i is not None and i in tokenizer.special_ids}

    def push(self, token: int) -> str:
        marker = self._kept.get(token)
        if marker is None:
            return self._inner.push(token)
        # The text so far ends here; decoding starts afresh after the marker.
        return self._inner.flush() + marker

    def flush(self) -> str:
        return self._inner.flush()
