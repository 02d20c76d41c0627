"""Stopped ranks seen from /proc: a real child process in a session of its own, stopped and continued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.waits import wait_until
from tp_ollama.membership.watch import StoppedWatch, kill_session, session_states


def test_a_stopped_process_of_a_session_is_named_after_the_grace():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        wait_until(lambda: child.pid in session_states(child.pid), what="the child in its session")
        assert os.getpid() not in session_states(child.pid)
        watch = StoppedWatch(grace_s=1.0)
        assert watch.check(child.pid, now=0.0) is None
        os.kill(child.pid, signal.SIGSTOP)
        wait_until(lambda: session_states(child.pid).get(child.pid) == "T", what="the child stopped")
        assert watch.check(child.pid, now=10.0) is None  # just seen stopped: not yet hung
        why = watch.check(child.pid, now=11.5)
        assert why is not None and str(child.pid) in why and "stopped for 1.5 s" in why
        os.kill(child.pid, signal.SIGCONT)
        wait_until(lambda: session_states(child.pid).get(child.pid) != "T", what="the child running again")
        assert watch.check(child.pid, now=20.0) is None
    finally:
        kill_session(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert session_states(child.pid) == {}
    kill_session(child.pid, signal.SIGKILL)  # a session that is gone: nothing to do, no error
