"""What happened to an engine group's membership, for /api/distributed/events and the Prometheus
counters: failures detected, groups formed, requests replayed, nodes that left and came back."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

MAX_EVENTS = 500

KINDS = ("joined", "left", "detected", "formed", "recovered", "replayed", "rejoined", "gave_up")


@dataclass
class EventLog:
    events: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=MAX_EVENTS))
    failures: int = 0
    recoveries: int = 0
    replayed_requests: int = 0
    recovery_seconds: float = 0.0
    _failed_at: float | None = None  # monotonic time of the failure being recovered from

    def add(self, kind: str, detail: str, **facts: Any) -> None:
        assert kind in KINDS, kind
        self.events.append({"time": time.time(), "kind": kind, "detail": detail, **facts})

    def failed(self, why: str, **facts: Any) -> None:
        """A failure was detected; the first one opens a recovery that `recovered` closes."""
        if self._failed_at is None:
            self._failed_at = time.monotonic()
            self.failures += 1
            self.add("detected", why, **facts)

    def recovered(self, detail: str, **facts: Any) -> None:
        if self._failed_at is None:
            return
        seconds = time.monotonic() - self._failed_at
        self._failed_at = None
        self.recoveries += 1
        self.recovery_seconds += seconds
        self.add("recovered", f"{detail} after {seconds:.2f} s", seconds=round(seconds, 3), **facts)

    @property
    def recovering(self) -> bool:
        return self._failed_at is not None

    def replayed(self, tokens: int, attempt: int) -> None:
        self.replayed_requests += 1
        self.add("replayed", f"a request resubmitted after {tokens} tokens (attempt {attempt})", tokens=tokens)

    def counters(self) -> dict[str, float]:
        return {
            "failures": self.failures,
            "recoveries": self.recoveries,
            "replayed_requests": self.replayed_requests,
            "recovery_seconds": round(self.recovery_seconds, 3),
        }
