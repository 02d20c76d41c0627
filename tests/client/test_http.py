"""The HTTP client's errors as a user sees them: one line saying what to do."""

from __future__ import annotations

import socket

from tests.client.live import SMOL, assert_one_line_error, cli


def test_no_server(command):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"127.0.0.1:{port}"
    for args in (["run", SMOL, "hi"], ["list"], ["ps"]):
        message = f"could not connect to tp-ollama server at http://{host} (is 'tp-ollama serve' running?)"
        assert_one_line_error(cli(command, host, *args), message)
