"""The interactive `run` as a user types it: a real pseudo-terminal, the real server (tests/client/conftest.py)."""

from __future__ import annotations

import pytest

from tests.client.live import FRANCE, SMOL, env_for


def test_interactive_chat_keeps_history(command, chat_server):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(command[0], [*command[1:], "run", SMOL], env=env_for(chat_server.host),
                          encoding="utf-8", timeout=60)  # fmt: skip
    try:
        child.expect_exact(">>> ")
        child.sendline(FRANCE)
        child.expect_exact("Paris")
        child.expect_exact(">>> ")
        child.sendline("And of Italy?")
        child.expect_exact(">>> ")
        turn2 = chat_server.recorder.bodies[-1]["messages"]
        assert [m["role"] for m in turn2] == ["user", "assistant", "user"]
        assert (
            turn2[0]["content"] == FRANCE and "Paris" in turn2[1]["content"] and turn2[2]["content"] == "And of Italy?"
        )
        child.sendline("/clear")
        child.expect_exact("Cleared session context")
        child.expect_exact(">>> ")
        child.sendline("/?")
        child.expect_exact("/bye")
        child.expect_exact(">>> ")
        child.sendline(FRANCE)
        child.expect_exact(">>> ")
        assert chat_server.recorder.bodies[-1]["messages"] == [{"role": "user", "content": FRANCE}]
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_interactive_ctrl_c_stops_the_answer_and_ctrl_d_leaves(command, chat_server):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(command[0], [*command[1:], "run", "smol-long"], env=env_for(chat_server.host),
                          encoding="utf-8", timeout=60)  # fmt: skip
    try:
        child.expect_exact(">>> ")
        child.sendline("Count from 1 to 1000, one number per line.")
        child.expect(r"\d")  # the answer has started; up to 4000 tokens are allowed
        child.sendintr()
        child.expect_exact(">>> ")
        # The server stopped that answer: a new question is answered at once, not after it.
        child.sendline(FRANCE)
        child.expect_exact("Paris")
        child.expect_exact(">>> ")
        assert [m["role"] for m in chat_server.recorder.bodies[-1]["messages"]] == ["user"]
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
