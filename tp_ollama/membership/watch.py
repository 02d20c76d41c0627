"""Watching a node's engine ranks from outside: a group's processes are one session (their launcher
was started with start_new_session), and a rank that is stopped (SIGSTOP, a tracer) holds up every
other rank's collective without closing anything. Its state in /proc says so at once, where a
heartbeat from inside the rank could not tell a stopped process from one in a long step."""

from __future__ import annotations

import os
import time
from pathlib import Path

STOPPED_STATES = frozenset("Tt")
# A rank seen stopped this long is hung, not caught in a moment's job control.
STOPPED_GRACE_S = 1.0
# /proc is scanned at most this often, however often a watcher asks: a scan reads every process's stat.
SCAN_EVERY_S = 0.25


def session_states(sid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> state letter of every process in session `sid` (empty where /proc is unavailable)."""
    out: dict[int, str] = {}
    try:
        entries = list(proc.iterdir())
    except OSError:
        return out
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            out[int(entry.name)] = fields[0]
    return out


class StoppedWatch:
    """Says which process of a session has been stopped for longer than `grace_s`."""

    def __init__(self, grace_s: float = STOPPED_GRACE_S) -> None:
        self.grace_s = grace_s
        self._since: dict[int, float] = {}
        self._scanned = -SCAN_EVERY_S

    def check(self, sid: int, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if now - self._scanned < SCAN_EVERY_S:
            return None
        self._scanned = now
        stopped = {pid for pid, state in session_states(sid).items() if state in STOPPED_STATES}
        self._since = {pid: self._since.get(pid, now) for pid in stopped}
        for pid, since in sorted(self._since.items()):
            if now - since >= self.grace_s:
                return f"process {pid} of the engine group has been stopped for {now - since:.1f} s"
        return None

    def reset(self) -> None:
        self._since.clear()
        self._scanned = -SCAN_EVERY_S


def kill_session(sid: int, sig: int) -> None:
    try:
        os.killpg(sid, sig)
    except (ProcessLookupError, PermissionError):
        pass
