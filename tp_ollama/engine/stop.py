"""Stop strings: end generation when one appears, and never emit it or anything after it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class StopMatcher:
    """Filters streamed text against stop strings.

    Text that could still be the start of a stop string is held back until the next pieces decide it:
    released if it diverges, dropped (with everything after it) if it completes a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        # An empty stop string would match everywhere; upstream ignores it.
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Feed the next decoded piece; returns (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            # The earliest occurrence wins; stops starting at the same place leave the same text before them.
            self._held = ""
            self._stopped = True
            return buffer[: min(hits)], True
        hold = self._partial_suffix(buffer)
        cut = len(buffer) - hold
        self._held = buffer[cut:]
        return buffer[:cut], False

    def flush(self) -> str:
        """At the end of generation, the held-back text (a prefix of a stop that never completed)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class StoppedText:
    """Token ids -> text cut at the first stop string: a detokenizer (IncrementalDetokenizer or the
    server's reply detokenizer) feeding a StopMatcher, as every text stream uses them."""

    def __init__(self, detokenizer: Detokenizer, stops: Sequence[str]) -> None:
        self._detok = detokenizer
        self._stop = StopMatcher(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        """The text this token lets out, and whether a stop string has ended the text."""
        return self._stop.push(self._detok.push(token_id))

    def finish(self) -> tuple[str, bool]:
        """At the end of generation: what is still held back (by either stage), and whether it ended
        in a stop string after all."""
        text, stopped = self._stop.push(self._detok.flush())
        return (text if stopped else text + self._stop.flush()), stopped
