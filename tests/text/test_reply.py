"""tp_ollama.text.reply: a reply read as it streams, the thinking split off first and tool calls then looked
for in the content; the markers each format asks the detokenizer to write out; the pieces joined for
stream:false (the parsers on their own: test_thinking.py, test_tool_calls.py; behind the detokenizer:
test_pipeline.py)."""

from __future__ import annotations

from tp_ollama.text import thinking, tool_calls
from tp_ollama.text.reply import Piece, ReplyFormat, ReplyParser

CALL = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'


def pushed(fmt: ReplyFormat, parts: list[str]) -> list[Piece]:
    """The Piece each part completes, then what flush() gives."""
    parser = ReplyParser(fmt)
    return [*(parser.push(part) for part in parts), parser.flush()]


def calls(piece: Piece) -> list[tuple[str, dict[str, object]]]:
    return [(c.name, c.arguments) for c in piece.tool_calls]


def test_the_markers_are_those_of_what_the_format_reads():
    assert ReplyFormat().markers() == ()
    assert ReplyFormat(thinking=True).markers() == thinking.MARKERS
    assert ReplyFormat(tools=frozenset()).markers() == tool_calls.MARKERS
    assert ReplyFormat(thinking=True, tools=frozenset({"f"})).markers() == (*thinking.MARKERS, *tool_calls.MARKERS)
    assert ReplyParser(ReplyFormat(tools=frozenset())).markers == tool_calls.MARKERS


def test_a_plain_reply_is_all_content_as_it_comes():
    assert pushed(ReplyFormat(), ["<think>a", "</think>", CALL]) == [
        Piece("<think>a"),
        Piece("</think>"),
        Piece(CALL),
        Piece(),
    ]


def test_thinking_is_split_off_and_an_open_prompt_starts_inside_it():
    assert ReplyParser(ReplyFormat(thinking=True)).finish("<think>why</think>because") == Piece("because", "why")
    assert ReplyParser(ReplyFormat(thinking=True, thinking_open=True)).finish("why</think>because") == Piece(
        "because", "why"
    )
    # Without thinking asked for, the tags are content like any other text.
    assert ReplyParser(ReplyFormat()).finish("<think>why</think>") == Piece("<think>why</think>")


def test_tool_calls_are_read_from_the_content_after_the_thinking():
    fmt = ReplyFormat(thinking=True, tools=frozenset({"f"}))
    reply = ReplyParser(fmt).finish(f"<think>call f</think>{CALL}")
    assert (reply.thinking, reply.content, calls(reply)) == ("call f", "", [("f", {"x": 1})])
    # Not a tool of the request: the JSON stays content.
    other = ReplyParser(ReplyFormat(tools=frozenset({"g"}))).finish('{"name": "f", "arguments": {}}')
    assert calls(other) == [] and other.content == '{"name": "f", "arguments": {}}'


def test_a_call_arriving_in_parts_is_given_by_the_part_that_completes_it():
    fmt = ReplyFormat(tools=frozenset({"f"}))
    pieces = pushed(fmt, ["Sure. ", CALL[:20], CALL[20:]])
    assert [calls(p) for p in pieces] == [[], [], [("f", {"x": 1})], []]
    assert Piece.join(pieces).content.strip() == "Sure."


def test_pieces_are_false_when_empty_and_join_in_order():
    assert not Piece() and Piece("a") and Piece(thinking="t")
    joined = Piece.join([Piece("a", "t"), Piece(), Piece("b", "u")])
    assert joined == Piece("ab", "tu")
    reply = ReplyParser(ReplyFormat(tools=frozenset({"f"}))).finish(CALL + CALL)
    assert [c.index for c in reply.tool_calls] == [0, 1]
