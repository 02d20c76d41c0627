"""`<think>...</think>` split off a reply as it streams: the parser on strings, fed whole and a few
characters at a time."""

from __future__ import annotations

import pytest

from tp_ollama.text.thinking import ThinkingParser


def split(text: str, step: int = 0, inside: bool = False) -> tuple[str, str]:
    """(thinking, content) of `text` fed whole (step 0) or `step` characters at a time."""
    parser = ThinkingParser(inside)
    thinking, content = [], []
    for i in range(0, len(text), step or max(len(text), 1)):
        t, c = parser.push(text[i : i + (step or len(text))])
        thinking.append(t)
        content.append(c)
    t, c = parser.flush()
    return "".join([*thinking, t]), "".join([*content, c])


CASES = {
    "tags": ("<think>a</think>b", False, ("a", "b")),
    "qwen3 whitespace": (
        "<think>\nStep one.\n\nStep two.\n</think>\n\nThe answer.",
        False,
        ("Step one.\n\nStep two.", "The answer."),
    ),
    "leading whitespace": ("\n <think>x</think>y", False, ("x", "y")),
    "no reasoning": ("Just an answer <think>x</think>", False, ("", "Just an answer <think>x</think>")),
    "empty reasoning": ("<think>\n\n</think>\n\nHi", False, ("", "Hi")),
    "prompt opened it": ("reasons</think>answer", True, ("reasons", "answer")),
    "cut off while thinking": ("<think>still going </thi", False, ("still going </thi", "")),
    "almost the tag": ("<thinking>x", False, ("", "<thinking>x")),
    "a tag prefix only": (" <thi", False, ("", " <thi")),
    "only whitespace": ("\n\n", False, ("", "\n\n")),
}


@pytest.mark.parametrize(("text", "inside", "expected"), CASES.values(), ids=CASES.keys())
def test_think_tags_are_split_off(text, inside, expected):
    for step in (0, 1, 2, 5):
        assert split(text, step, inside) == expected, step


def test_thinking_streams_as_it_comes_and_holds_back_only_a_possible_tag():
    parser = ThinkingParser()
    assert parser.push("<th") == ("", "")
    assert parser.push("ink>Let me") == ("Let me", "")
    assert parser.push(" see.\n</thi") == (" see.", "")  # trailing space and a possible tag wait
    assert parser.push("nk>\nBlue.") == ("", "Blue.")
    assert parser.push(" Because.") == ("", " Because.")
    assert parser.flush() == ("", "")
