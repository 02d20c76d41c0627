"""Rank 0's links: the socket to the front end (frames in pieces, a front end that leaves or
talks nonsense) and the in-process one."""

from __future__ import annotations

import socket

from tp_ollama.engine.link import LocalLink, SocketLink
from tp_ollama.engine.protocol import Cancel, FrameBuffer, Shutdown, Token, decode_reply, frame

WAIT_S = 10.0  # only a hang reaches it


def test_commands_sent_in_pieces_arrive_whole_and_replies_go_back():
    front, back = socket.socketpair()
    link = SocketLink(conn=back)
    data = frame(Cancel("r1")) + frame(Shutdown())
    front.sendall(data[:3])
    assert link.poll(0) == []  # half a header: nothing yet
    front.sendall(data[3:])
    got = link.poll(WAIT_S)
    assert got == [Cancel("r1"), Shutdown()]
    link.send(Token("r1", 5))
    buffer = FrameBuffer()
    while not (frames := buffer.pop_all()):
        buffer.feed(front.recv(1 << 16))
    assert [decode_reply(f) for f in frames] == [Token("r1", 5)]
    front.close()
    link.close()


def test_a_front_end_that_leaves_is_lost_and_a_socket_pair_is_then_closed():
    front, back = socket.socketpair()
    link = SocketLink(conn=back)
    front.close()
    assert link.poll(WAIT_S) == []
    assert link.lost and link.closed
    link.send(Token("r1", 1))  # nobody to tell: dropped, no error


def test_a_front_end_sending_what_the_protocol_does_not_know_is_dropped():
    front, back = socket.socketpair()
    link = SocketLink(conn=back)
    front.sendall(frame(Cancel("r1")) + b"\x00\x00\x00\x02\xc1\xc1")  # a good frame, then garbage
    assert link.poll(WAIT_S) == [Cancel("r1")]
    assert link.lost
    front.close()


def test_a_listening_link_takes_a_new_front_end_after_one_leaves(tmp_path):
    path = str(tmp_path / "engine.sock")
    link = SocketLink(path)
    for rid in ("a", "b"):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.sendall(frame(Cancel(rid)))
        assert link.poll(WAIT_S) == [Cancel(rid)]
        client.close()
        assert link.poll(WAIT_S) == [] and link.lost and not link.closed
        link.lost = False
    link.close()


def test_local_link_hands_over_what_was_put_in():
    link = LocalLink()
    link.inbox.append(Cancel("x"))
    assert link.poll(0) == [Cancel("x")] and link.poll(0) == []
    link.send(Token("x", 3))
    assert list(link.outbox) == [Token("x", 3)] and not link.closed
