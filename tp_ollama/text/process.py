"""The text side of a one-shot generation in a process of its own, started before torch is imported.

Loading a 262k-token tokenizer (gemma3's: 515k BPE merges) takes about a second and holds the GIL
throughout, and importing torch takes as long: in one process they add up, in two they overlap on
two cores, and the first token comes about a second sooner. This process loads the tokenizer,
encodes the prompt, then turns each token id the engine sends into text on stdout, cutting at stop
strings; after each id it answers whether generation goes on. Nothing here imports torch.

Protocol over a pipe, each message a tuple:
  helper -> engine  ("ids", prompt ids, end-of-sequence ids) | ("error", message)
  engine -> helper  token id (int) | None (no more tokens: flush)
  helper -> engine  ("more",) after a token | ("done", stopped) when a stop string ended the text,
                    or after the flush
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Generator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tp_ollama.errors import TpOllamaError
from tp_ollama.text.pipeline import PlainText, TextPipeline
from tp_ollama.text.prompt import prompt_tokens, tokenizer_at

START_TIMEOUT_S = 300.0  # tokenizer load (a first one converts it: tens of seconds) and prompt encoding
STEP_TIMEOUT_S = 60.0  # one token's text
EXIT_TIMEOUT_S = 10.0


class TextProcess:
    """The engine's handle on the helper process."""

    def __init__(self, path: Path, prompt: str, chat: bool, system: str | None, stops: Sequence[str]) -> None:
        # fork: the child starts at once with what this process has imported (not torch, not yet).
        context = multiprocessing.get_context("fork")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_conn, path, prompt, chat, system, tuple(stops)), daemon=True
        )
        self._process.start()
        child_conn.close()
        self.stopped = False
        self._finished = False

    def prompt(self) -> tuple[list[int], frozenset[int]]:
        """The encoded prompt and the end-of-sequence ids; a tokenizer or template error is raised here."""
        reply = self._receive(START_TIMEOUT_S, "encode the prompt")
        if reply[0] == "error":
            raise TpOllamaError(reply[1])
        return list(reply[1]), frozenset(reply[2])

    def push(self, token: int) -> bool:
        """Print a token's text; False when a stop string ended the text (generate no more)."""
        self._send(token, "print a token")
        reply = self._receive(STEP_TIMEOUT_S, "print a token")
        if reply[0] == "done":
            self.stopped = True
            return False
        return True

    def print_tokens(self, tokens: Generator[int, None, None]) -> bool:
        """Print a generation's tokens as they come, then the end of the text; True when a stop string
        ended it (the generator is closed then, which ends the generation)."""
        try:
            for token in tokens:
                if not self.push(token):
                    break
        finally:
            tokens.close()
        self.finish()
        return self.stopped

    def finish(self) -> None:
        """Print what is held back and wait for the helper to exit."""
        if not self.stopped:
            self._send(None, "print the end of the text")
            self._receive(STEP_TIMEOUT_S, "print the end of the text")
        self._finished = True
        self.close()

    def close(self) -> None:
        """Reap the helper: after finish() it is exiting by itself; otherwise (an error here, Ctrl-C)
        it is killed at once, as it may still be loading the tokenizer."""
        self._conn.close()
        if self._finished:
            self._process.join(EXIT_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
        self._process.join(EXIT_TIMEOUT_S)

    def _send(self, message: int | None, what: str) -> None:
        try:
            self._conn.send(message)
        except OSError:  # BrokenPipeError: the helper is gone
            raise TpOllamaError(f"the text process exited before it could {what}") from None

    def _receive(self, timeout_s: float, what: str) -> tuple[Any, ...]:
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
        except (EOFError, OSError):
            raise TpOllamaError(f"the text process exited before it could {what}") from None
        raise TpOllamaError(f"the text process did not {what} within {timeout_s:g} s")


def _serve(conn: Connection, path: Path, prompt: str, chat: bool, system: str | None, stops: Sequence[str]) -> None:
    try:
        try:
            tokenizer = tokenizer_at(path)
            ids = prompt_tokens(tokenizer, prompt, chat=chat, system=system)
        except TpOllamaError as e:
            conn.send(("error", str(e)))
            return
        conn.send(("ids", ids, sorted(tokenizer.eos_ids)))
        text = TextPipeline(tokenizer, stops, PlainText())
        while True:
            token = conn.recv()
            if token is None:
                _write("".join(text.finish()))
                conn.send(("done", False))
                return
            _write("".join(text.push(token)))
            conn.send(("done", True) if text.stopped else ("more",))
            if text.stopped:
                return
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the engine ended first (an error, Ctrl-C)
        os._exit(1)


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
