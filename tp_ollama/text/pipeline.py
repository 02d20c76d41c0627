"""Token ids -> text, the one way every text stream takes it: the server's replies
(server/text_service.py), the text of an in-process generation (completion.text_pieces), and the
helper process of a one-shot `generate`, in process or on TP ranks (text/process.py).

Each token id goes through three stages:
  1. the incremental detokenizer (text/detokenize.py): ids -> text, never a partial character;
  2. the stop strings (text/stop.py): the text ends at the first one, which is never emitted;
  3. a reader, where a stream reads the text as it comes: `PlainText` hands it on as it is; the
     server's `ReplyParser` (text/reply.py) splits it into thinking, content and tool calls. The
     special tokens named in a reader's `markers` are written out by the detokenizer for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from tp_ollama.text.detokenize import IncrementalDetokenizer, MarkerDecoder, ReplyDetokenizer
from tp_ollama.text.stop import StopMatcher

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)


class Reader(Protocol[P_co]):
    """Reads the text between the stop strings and the consumer; what it gives is dropped when falsy."""

    @property
    def markers(self) -> tuple[str, ...]:
        """Special tokens' texts the reader looks for, which decoding would otherwise drop."""
        ...

    def push(self, text: str) -> P_co:
        """What the next (non-empty) text completes."""
        ...

    def flush(self) -> P_co:
        """What is held back, once a stop string has ended the text."""
        ...

    def finish(self, text: str) -> P_co:
        """The last text (may be empty) and what is held back, at the end of generation."""
        ...


class PlainText:
    """The reader of a stream that wants the text as it is."""

    markers: tuple[str, ...] = ()

    def push(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""

    def finish(self, text: str) -> str:
        return text


class TextPipeline(Generic[P]):
    """`push(id)` -> what that token lets out through the reader (often nothing); `finish()` -> what
    is left at the end of generation. `stopped` says whether a stop string ended the text: after a
    push that sets it, generate no more."""

    def __init__(self, tokenizer: MarkerDecoder, stops: Sequence[str], reader: Reader[P]) -> None:
        markers = reader.markers
        self._detok: IncrementalDetokenizer | ReplyDetokenizer = (
            ReplyDetokenizer(tokenizer, markers) if markers else IncrementalDetokenizer(tokenizer)
        )
        self._stop = StopMatcher(stops)
        self._reader = reader
        self.stopped = False

    def push(self, token_id: int) -> list[P]:
        text, self.stopped = self._stop.push(self._detok.push(token_id))
        out = [self._reader.push(text)] if text else []
        if self.stopped:
            out.append(self._reader.flush())
        return [p for p in out if p]

    def finish(self) -> list[P]:
        # What either text stage still holds; it may end in a stop string after all.
        text, self.stopped = self._stop.push(self._detok.flush())
        if not self.stopped:
            text += self._stop.flush()
        last = self._reader.finish(text)
        return [last] if last else []
