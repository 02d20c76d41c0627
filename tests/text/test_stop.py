"""StopMatcher: stop strings are never emitted, held-back text is released or dropped correctly."""

from __future__ import annotations

from tp_ollama.text.stop import StopMatcher


def _run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Push every piece until a stop; returns (what each push emitted, stopped?, flush())."""
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        emitted.append(text)
        if stopped:
            return emitted, True, matcher.flush()
    return emitted, False, matcher.flush()


def test_a_stop_spanning_several_pushes_is_not_emitted() -> None:
    emitted, stopped, rest = _run(["</s>"], ["Hello <", "/", "s> and more"])
    assert emitted == ["Hello ", "", ""]
    assert stopped
    assert rest == ""


def test_a_partial_prefix_is_released_when_the_text_diverges() -> None:
    emitted, stopped, rest = _run(["</s>"], ["a <", "/", "b c"])
    assert emitted == ["a ", "", "</b c"]
    assert not stopped
    assert rest == ""


def test_the_earliest_of_several_stops_wins() -> None:
    emitted, stopped, _ = _run(["STOP", "END"], ["x END y STOP"])
    assert emitted == ["x "]
    assert stopped
    # "abc" could still start at 0, but "bd" has appeared: generation ends there.
    emitted, stopped, _ = _run(["abc", "bd"], ["ab", "d"])
    assert emitted == ["", "a"]
    assert stopped


def test_a_stop_at_the_very_start_emits_nothing() -> None:
    emitted, stopped, _ = _run(["<|end|>"], ["<|end|>trailing"])
    assert emitted == [""]
    assert stopped


def test_flush_returns_an_unfinished_prefix() -> None:
    emitted, stopped, rest = _run(["</s>"], ["the end </"])
    assert emitted == ["the end "]
    assert not stopped
    assert rest == "</"


def test_self_overlapping_stop_is_found_across_pushes() -> None:
    emitted, stopped, _ = _run(["aab"], ["a", "a", "a", "b"])
    assert "".join(emitted) == "a"
    assert stopped


def test_pushes_after_a_stop_emit_nothing() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("1x2") == ("1", True)
    assert matcher.push("more") == ("", True)
    assert matcher.stopped
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    emitted, stopped, rest = _run(["", "zz"], ["abc", "def"])
    assert emitted == ["abc", "def"]
    assert not stopped
    assert rest == ""
    assert _run([], ["anything"]) == (["anything"], False, "")
