"""A node's engine host: its group spec, its ranks' supervision (forked doubles of the rank body,
which a real group runs in the serve and cluster tests), and the standby kept ready."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.waits import wait_until
from tp_ollama.engine import host as host_module
from tp_ollama.engine.host import GroupSpec, HostLauncher, host


def test_a_spec_travels_as_one_json_line():
    spec = GroupSpec(ranks=(1, 2), world_size=3, master_addr="10.0.0.1", master_port=4000, tp_weights="2,1,1")
    line = spec.line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    import msgspec

    assert msgspec.json.decode(line, type=GroupSpec) == spec


def test_the_first_rank_to_fail_takes_the_others_down(monkeypatch):
    def rank(spec: GroupSpec, local: int, files: object = None) -> int:
        if local == 0:
            time.sleep(60)  # a rank waiting on its peer: killed when the peer fails
            return 0
        return 3

    monkeypatch.setattr(host_module, "_rank", rank)
    t0 = time.monotonic()
    assert host(GroupSpec(ranks=(0, 1), world_size=2, master_addr="127.0.0.1", master_port=1)) == 3
    assert time.monotonic() - t0 < 30


def test_a_group_whose_ranks_all_end_well_exits_0(monkeypatch):
    monkeypatch.setattr(host_module, "_rank", lambda spec, local, files: 0)
    assert host(GroupSpec(ranks=(0, 1, 2), world_size=3, master_addr="127.0.0.1", master_port=1)) == 0


def test_a_rank_killed_by_a_signal_is_a_failure(monkeypatch):
    def rank(spec: GroupSpec, local: int, files: object = None) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    monkeypatch.setattr(host_module, "_rank", rank)
    assert host(GroupSpec(ranks=(0,), world_size=1, master_addr="127.0.0.1", master_port=1)) == 128 + 9


def test_a_standby_waits_for_its_spec_and_goes_when_closed():
    launcher = HostLauncher()
    launcher.prepare()
    ready = launcher._ready
    assert ready is not None
    launcher.prepare()
    assert launcher._ready is ready  # one at a time
    proc = psutil.Process(ready.pid)
    assert os.getsid(ready.pid) == ready.pid  # a session of its own: a group is stopped as one
    launcher.close()
    wait_until(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, what="the standby gone")
    assert launcher._ready is None


def test_a_standby_given_nothing_exits_cleanly():
    launcher = HostLauncher()
    launcher.prepare()
    ready = launcher._ready
    assert ready is not None and ready.stdin is not None
    ready.stdin.close()  # no spec: the front end went away before it needed this host
    assert ready.wait(timeout=60) == 0
