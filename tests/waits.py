"""Waiting in tests: on the condition awaited, never on a sleep or a wall-clock window. The deadline only
turns a hang into a failure; it is far beyond what anything awaited here takes on a busy 2-core machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

HANG_S = 60.0  # past this, the thing awaited has hung
POLL_S = 0.02  # between looks at a condition that another thread or process makes true


def wait_until(predicate: Callable[[], object], timeout_s: float = HANG_S, *, what: str) -> None:
    """Look at `predicate` until it holds; fail naming `what` (the condition awaited) if it does not
    within `timeout_s`. A predicate may assert, to fail at once on what rules the condition out."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(POLL_S)


async def wait_until_async(predicate: Callable[[], object], timeout_s: float = HANG_S, *, what: str) -> None:
    """wait_until on an event loop: the loop runs the tasks that make `predicate` hold while this waits."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        await asyncio.sleep(POLL_S)
