"""The membership channel's messages, framing and secret."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from tp_ollama.engine.protocol import FRAME_HEADER
from tp_ollama.membership import wire


def test_every_message_survives_its_frame_in_pieces():
    msgs = [
        wire.Challenge("ab" * 16),
        wire.Hello(2, 1, "host", 123, "cd" * 16, "ef" * 32),
        wire.Form(
            generation=3, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=4000, ranks=(1, 2), world_size=3
        ),
        wire.Stop(3),
        wire.Exited(3, -9),
        wire.Hung(3, "process 7 stopped"),
        wire.Beat(),
        wire.Bye(),
    ]
    data = b"".join(wire.frame(m) for m in msgs)
    frames = wire.Frames()
    for i in range(0, len(data), 7):  # a socket hands bytes over in arbitrary pieces
        frames.feed(data[i : i + 7])
    assert list(frames.ready) == msgs


def test_a_frame_announcing_too_much_is_refused():
    frames = wire.Frames()
    with pytest.raises(ValueError, match="more than the 65536 allowed"):
        frames.feed(FRAME_HEADER.pack(wire.MAX_FRAME + 1))


def test_recv_one_keeps_later_messages_and_reports_a_closed_peer():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire.frame(wire.Beat()) + wire.frame(wire.Stop(1)))
        frames = wire.Frames()
        assert wire.recv_one(b, frames, 5) == wire.Beat()
        assert wire.recv_one(b, frames, 5) == wire.Stop(1)
        a.close()
        with pytest.raises(ConnectionError):
            wire.recv_one(b, frames, 5)


def test_a_proof_depends_on_the_secret_and_on_every_fact():
    base = wire.hello_mac("s3cret", "n1", 1, 1, "h", 5, "n2")
    assert wire.proves("s3cret", base, wire.hello_mac("s3cret", "n1", 1, 1, "h", 5, "n2"))
    assert not wire.proves("s3cret", base, wire.hello_mac("other", "n1", 1, 1, "h", 5, "n2"))
    assert not wire.proves("s3cret", base, wire.hello_mac("s3cret", "n1", 2, 1, "h", 5, "n2"))
    assert not wire.proves("s3cret", base, wire.hello_mac("s3cret", "n9", 1, 1, "h", 5, "n2"))


def test_node_0_generates_a_private_secret_once_and_others_find_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TP_OLLAMA_CACHE", str(tmp_path))
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    assert wire.configured_secret("") == ""
    secret, generated = wire.ensure_secret("")
    assert generated and len(secret) >= 24
    assert stat.S_IMODE(os.stat(wire.secret_file()).st_mode) == 0o600
    assert wire.ensure_secret("") == (secret, False)  # kept, not made again
    assert wire.configured_secret("") == secret
    monkeypatch.setenv(wire.SECRET_ENV, "from-env")
    assert wire.configured_secret("") == "from-env"
    assert wire.configured_secret("from-config") == "from-config"
