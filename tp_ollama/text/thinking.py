"""Reasoning split off a reply while it streams: `<think>...</think>` at the start of the reply is the
thinking, the rest the content (Qwen3, DeepSeek-R1 and the models trained like them).

Whitespace around the tags is dropped: the thinking starts at its first visible character and loses
its trailing whitespace, and the content starts after the whitespace that follows `</think>`.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MARKERS = (THINK_OPEN, THINK_CLOSE)

# Before the reply shows whether it thinks; inside the reasoning; after it (or with none).
_LOOKING, _THINKING, _CONTENT = "looking", "thinking", "content"


class ThinkingParser:
    """`push(text)` -> (thinking, content) that `text` completes; `flush()` gives what is held back.

    `inside`: the prompt already ends in `<think>` (templates that open the reasoning for the model),
    so the reply starts in the thinking and only `</think>` is to be found."""

    def __init__(self, inside: bool = False) -> None:
        self._state = _THINKING if inside else _LOOKING
        self._buf = ""
        self._skip_space = inside  # whitespace right after a tag is dropped

    def push(self, text: str) -> tuple[str, str]:
        self._buf += text
        return self._run(final=False)

    def flush(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        thinking: list[str] = []
        content: list[str] = []
        while self._buf:
            if self._skip_space:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._skip_space = False
            if self._state == _LOOKING:
                if not self._look(final):
                    break
            elif self._state == _THINKING:
                done, text = self._think(final)
                thinking.append(text)
                if not done:
                    break
            else:
                content.append(self._buf)
                self._buf = ""
        return "".join(thinking), "".join(content)

    def _look(self, final: bool) -> bool:
        """Decide whether the reply opens with `<think>`; False to wait for more text."""
        start = self._buf.lstrip()
        if start.startswith(THINK_OPEN):
            self._state, self._buf, self._skip_space = _THINKING, start[len(THINK_OPEN) :], True
            return True
        if not final and THINK_OPEN.startswith(start):  # whitespace only, or part of the tag
            return False
        self._state = _CONTENT
        return True

    def _think(self, final: bool) -> tuple[bool, str]:
        """(tag closed, thinking text to hand on); holds back what may be the start of `</think>`
        and trailing whitespace, which is dropped if the tag follows."""
        close = self._buf.find(THINK_CLOSE)
        if close >= 0:
            text = self._buf[:close].rstrip()
            self._state, self._buf, self._skip_space = _CONTENT, self._buf[close + len(THINK_CLOSE) :], True
            return True, text
        if final:
            text, self._buf = self._buf.rstrip(), ""
            return False, text
        keep = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if self._buf.endswith(THINK_CLOSE[:n])), 0)
        text = self._buf[: len(self._buf) - keep].rstrip()
        self._buf = self._buf[len(text) :]
        return False, text
