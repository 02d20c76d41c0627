"""The one text pipeline: token ids -> text cut at stop strings -> a reader (plain text, or the
server's thinking and tool-call reader), on a one-character-per-token double and on a real tokenizer."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TypeVar

from tp_ollama.checkpoints.tokenizer import Tokenizer
from tp_ollama.text.pipeline import PlainText, Reader, TextPipeline
from tp_ollama.text.reply import Piece, ReplyFormat, ReplyParser

EOS, PYTHON_TAG = 0, 1
VOCAB = ["<eos>", "<|python_tag|>", *string.printable]
P = TypeVar("P")


class CharTokenizer:
    """Token i is VOCAB[i]; the special tokens (end of sequence, `<|python_tag|>`) decode to nothing
    unless asked, as a real tokenizer's do."""

    special_ids = frozenset({EOS, PYTHON_TAG})

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i in self.special_ids))

    def token_to_id(self, token: str) -> int | None:
        return VOCAB.index(token) if token in VOCAB else None


def encode(text: str) -> list[int]:
    return [VOCAB.index(c, 2) for c in text]


def run(
    ids: list[int], stops: Sequence[str], reader: Reader[P], tokenizer: Tokenizer | None = None
) -> tuple[list[list[P]], bool]:
    """What each push lets out (up to the one that stopped), then what finish() gives unless stopped."""
    pipeline = TextPipeline(tokenizer or CharTokenizer(), stops, reader)
    out: list[list[P]] = []
    for token in ids:
        out.append(pipeline.push(token))
        if pipeline.stopped:
            return out, True
    out.append(pipeline.finish())
    return out, pipeline.stopped


def test_plain_text_is_the_decoded_text():
    out, stopped = run([*encode("hello world"), EOS], (), PlainText())
    assert "".join(p for pieces in out for p in pieces) == "hello world" and not stopped
    assert all(len(pieces) <= 1 for pieces in out)  # one piece per token at most, no empty ones


def test_a_stop_string_ends_the_text_and_is_never_emitted():
    out, stopped = run(encode("hello world"), ["wor"], PlainText())
    assert stopped and len(out) == len("hello wor")  # generation ends at the token that completes it
    assert "".join(p for pieces in out for p in pieces) == "hello "


def test_text_held_back_as_a_possible_stop_comes_out_at_the_end():
    out, stopped = run(encode("hello wo"), ["world"], PlainText())
    assert not stopped and out[-1] == ["wo"]
    assert "".join(p for pieces in out for p in pieces) == "hello wo"


def test_the_reader_gets_the_text_and_its_marker_tokens():
    ids = [PYTHON_TAG, *encode('{"name": "f", "parameters": {"x": 1}}'), EOS]
    out, stopped = run(ids, (), ReplyParser(ReplyFormat(tools=frozenset({"f"}))))
    reply = Piece.join(p for pieces in out for p in pieces)
    assert not stopped and reply.content == ""
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("f", {"x": 1})]


def test_a_stop_string_hands_on_what_the_reader_held():
    ids = encode('<tool_call>{"name": "f", "arguments": {}}STOP and more')
    out, stopped = run(ids, ["STOP"], ReplyParser(ReplyFormat(tools=frozenset({"f"}))))
    assert stopped
    (last,) = out[-1]  # the call, whose closing tag never came, is read at the stop
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("f", {})]
    assert Piece.join(p for pieces in out for p in pieces).content == ""


def test_thinking_is_split_off_on_a_real_tokenizer(chat_tokenizer: Tokenizer):
    ids = [*chat_tokenizer.encode("<think>a</think>b", add_special_tokens=False), *chat_tokenizer.eos_ids]
    out, stopped = run(ids, (), ReplyParser(ReplyFormat(thinking=True)), chat_tokenizer)
    reply = Piece.join(p for pieces in out for p in pieces)
    assert (reply.thinking, reply.content, stopped) == ("a", "b", False)
