"""The membership event log and its counters."""

from __future__ import annotations

import pytest

from tp_ollama.membership.events import EventLog


def test_a_failure_opens_one_recovery_that_its_recovery_closes():
    log = EventLog()
    assert not log.recovering
    log.failed("node 1 left")
    log.failed("node 2 left")  # the same outage: counted once
    assert log.recovering and log.failures == 1
    log.replayed(10, 1)
    log.recovered("serving at world size 2")
    log.recovered("again")  # nothing open: no second recovery
    assert not log.recovering
    c = log.counters()
    assert (c["failures"], c["recoveries"], c["replayed_requests"]) == (1, 1, 1)
    assert c["recovery_seconds"] >= 0
    kinds = [e["kind"] for e in log.events]
    assert kinds == ["detected", "replayed", "recovered"]
    assert all(e["time"] > 0 and e["detail"] for e in log.events)


def test_an_unknown_kind_is_a_bug():
    with pytest.raises(AssertionError):
        EventLog().add("exploded", "no such kind")
