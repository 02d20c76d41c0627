"""Stop strings: end generation when one appears, and never emit it or anything after it."""

from __future__ import annotations

from collections.abc import Sequence


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
