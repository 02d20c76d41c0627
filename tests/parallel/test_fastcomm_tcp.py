"""The emulated link delay of the TCP transport (TP_OLLAMA_LINK_DELAY_US): two real ranks see every small
all-reduce take at least the delay, none without it, and a bad value is refused before any socket opens."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
import traceback
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tp_ollama.errors import ConfigError
from tp_ollama.parallel.fastcomm import FastGroup
from tp_ollama.parallel.fastcomm_tcp import LINK_DELAY_ENV, TcpTransport, hold, link_delay_s

DELAY_US = 500
ROUNDS = 100
ANSWER_TIMEOUT = 60.0


def _set_delay_env(value: str | None) -> None:
    if value is None:
        os.environ.pop(LINK_DELAY_ENV, None)
    else:
        os.environ[LINK_DELAY_ENV] = value


def _tcp_group(store: dist.Store, rank: int, name: str, delay_env: str | None) -> FastGroup:
    _set_delay_env(delay_env)
    return FastGroup.create(store, rank, 2, transport="tcp", name=name, timeout=20)


def _median_all_reduce_s(turns: dict[str, tuple[FastGroup, str | None]]) -> dict[str, float]:
    """Each group's median all-reduce time, with the delay variable as given while it runs (set after the group
    was made). The groups take turns round by round, so that whatever else the machine runs slows them alike."""
    x = torch.ones(640)  # 2.5 KB, a decode step's all-reduce
    warm_up = 10  # first calls pay for views and socket buffers
    times: dict[str, list[float]] = {label: [] for label in turns}
    for i in range(warm_up + ROUNDS):
        for label, (g, delay_env) in turns.items():
            _set_delay_env(delay_env)
            t0 = time.perf_counter()
            g.all_reduce(x)
            if i >= warm_up:
                times[label].append(time.perf_counter() - t0)
    assert all(g.transport == "tcp" for g, _ in turns.values())
    return {label: statistics.median(ts) for label, ts in times.items()}


def _rank_main(rank: int, port: int, answers: Any) -> None:
    """One rank: the median all-reduce time with the delay, without it, and with it set only after the group
    was created."""
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        with ExitStack() as stack:
            delayed = stack.enter_context(_tcp_group(store, rank, "delayed", str(DELAY_US)))
            plain = stack.enter_context(_tcp_group(store, rank, "plain", None))
            late = stack.enter_context(_tcp_group(store, rank, "late", None))
            # "late" runs with ten times the delay in the environment: too late, its transport read it when made
            turns = {"delayed": (delayed, str(DELAY_US)), "plain": (plain, None), "late": (late, str(DELAY_US * 10))}
            answers.put((rank, True, _median_all_reduce_s(turns)))
    except BaseException:
        answers.put((rank, False, traceback.format_exc()))


def test_a_delay_slows_every_all_reduce_and_no_delay_costs_nothing() -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, master.port, answers), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [answers.get(timeout=ANSWER_TIMEOUT) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    failures = [value for _, ok, value in got if not ok]
    assert failures == []
    for rank, _, t in got:
        # Each rank holds its own message DELAY_US before sending, so no all-reduce can be quicker.
        assert t["delayed"] >= DELAY_US * 1e-6, (rank, t)
        # Without a delay a loopback all-reduce takes tens of µs: far below the delay, in the same rounds.
        assert t["plain"] < t["delayed"] - DELAY_US * 0.6e-6, (rank, t)
        # Set after the group was made, ten times the delay would make every all-reduce take ten times as long
        # as a delayed one; it has no delay at all.
        assert t["late"] < t["delayed"] - DELAY_US * 0.6e-6, (rank, t)


@pytest.mark.parametrize("raw", ["abc", "-5", "1.5", "200us", "10000001"])
def test_a_bad_value_is_refused_with_the_expected_form(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LINK_DELAY_ENV, raw)
    with pytest.raises(ConfigError) as err:
        # Refused before it opens a socket or waits for a peer: a store no rank ever joins is enough.
        TcpTransport.connect(dist.HashStore(), "p/", 1, 0, 2, 1024, 1.0, 0.0)
    assert LINK_DELAY_ENV in str(err.value) and repr(raw) in str(err.value)
    assert "whole number of microseconds" in str(err.value)


@pytest.mark.parametrize(("raw", "seconds"), [(None, 0.0), ("", 0.0), ("0", 0.0), (" 250 ", 250e-6)])
def test_unset_empty_and_zero_mean_no_delay(raw: str | None, seconds: float) -> None:
    environ = {} if raw is None else {LINK_DELAY_ENV: raw}
    assert link_delay_s(environ) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [30e-6, 400e-6])
def test_hold_waits_at_least_the_delay(seconds: float) -> None:
    t0 = time.perf_counter()
    hold(seconds)
    assert time.perf_counter() - t0 >= seconds
