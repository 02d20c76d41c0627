"""Token ids -> text, one id at a time, for streaming.

Decoding each id alone is wrong in two ways: a character split over several tokens (byte-level BPE
pieces, SentencePiece byte-fallback tokens like <0xE2>) decodes to U+FFFD until its last byte
arrives, and some decoders treat a sequence's first token specially (dropping its leading space),
so a token's text depends on what comes before it. The usual fix (text-generation-inference, vLLM)
decodes a short window twice: the tokens already emitted in the last step (`prefix`) alone, and the
prefix plus the tokens not yet emitted. The difference is the new text; it is held back while it ends
in U+FFFD (a character still incomplete), and once emitted the window slides forward. Each push
decodes a window of a few tokens, so the cost per token does not grow with the sequence.

`ReplyDetokenizer` writes out the special tokens that a reply's readers look for (`[TOOL_CALLS]`,
`<|python_tag|>`, which some vocabularies hold as special tokens), since decoding drops them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (tp_ollama.checkpoints.tokenizer.Tokenizer has it)."""

    special_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """`push(id)` returns the text that id completes (often "", never a partial character);
    `flush()` returns what is held back at the end. All pushes + flush equal
    `tokenizer.decode(all_ids, skip_special_tokens)`."""

    def __init__(self, tokenizer: TokenDecoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._window: list[int] = []  # prefix ids (already emitted), then ids not yet emitted
        self._read = 0  # window[:read] is the prefix
        self._prefix_text = ""  # decode(window[:read])

    def push(self, token_id: int) -> str:
        if self._skip_special and token_id in self._tokenizer.special_ids:
            # decode() drops these before its decoder runs, so leaving them out of the window is exact;
            # it also keeps a run of them from growing the window.
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""
        new = text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix: enough context for the next decode.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD, as decode gives it)."""
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        new = text[len(self._prefix_text) :]
        self._window, self._read, self._prefix_text = [], 0, ""
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)


class MarkerDecoder(TokenDecoder, Protocol):
    """A TokenDecoder that can also look a token up by its text."""

    def token_to_id(self, token: str) -> int | None: ...


class ReplyDetokenizer:
    """IncrementalDetokenizer that writes out the special tokens among `markers` instead of dropping
    them; every other special token is dropped as before."""

    def __init__(self, tokenizer: MarkerDecoder, markers: Iterable[str]) -> None:
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
