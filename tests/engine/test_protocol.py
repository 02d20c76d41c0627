"""The engine's messages: each one decodes to what was encoded, the unions tell them apart by tag,
frames survive arriving in pieces, and bad input is refused with a clear error."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from tp_ollama.engine.options import GenerationOptions, SamplingOptions
from tp_ollama.engine.protocol import (
    FRAME_HEADER,
    MAX_FRAME,
    Ack,
    Cancel,
    ClusterFacts,
    DescribeCluster,
    Done,
    Embed,
    Embedded,
    Failed,
    FinalStats,
    FrameBuffer,
    Generate,
    Load,
    Loaded,
    LoadInfo,
    OutputFormat,
    Plan,
    RankFailure,
    Request,
    Shutdown,
    Tick,
    Token,
    Unload,
    decode_command,
    decode_failure,
    decode_reply,
    decode_tick,
    encode,
    frame,
    read_frame,
)
from tp_ollama.errors import RequestError

OPTIONS = GenerationOptions(SamplingOptions(temperature=0.5, seed=7, top_k=3), num_predict=9, num_ctx=64, stop=("x",))

COMMANDS = [
    Generate("r1", [1, 2, 3], OPTIONS, frozenset({2, 5}), OutputFormat("schema", {"type": "object"})),
    Generate("r2", [4], GenerationOptions(), frozenset()),
    Cancel("r1"),
    Load("c1", "/models/m.gguf", "bfloat16", 2048, "int4"),
    Unload("c2"),
    Embed("c3", [[1, 2], [3]]),
    DescribeCluster("c4"),
    Shutdown(),
]

INFO = LoadInfo("/m.gguf", "float32", 4096, "none", 2, [{"rank": 0, "heads": 2}], 10, {"dtype": "float32"}, 0.5, 8, 16)
REPLIES = [
    Token("r1", 42),
    Done("r1", FinalStats("length", 3, 100, 9, 900, 5, 2)),
    Failed("r2", "the prompt is empty"),
    Loaded("c1", INFO),
    Embedded("c3", [[0.5, 0.25], [1.0, 0.0]]),
    ClusterFacts("c4", 2, [{"rank": 0}, {"rank": 1}], 1.5, {"blocks": 8}, 1, 0),
    Ack("c2"),
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_decodes_to_itself(cmd):
    got = decode_command(encode(cmd))
    assert type(got) is type(cmd) and got == cmd


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_every_reply_decodes_to_itself(reply):
    got = decode_reply(encode(reply))
    assert type(got) is type(reply) and got == reply


def test_options_cross_as_themselves_and_are_validated_on_arrival():
    got = decode_command(encode(COMMANDS[0]))
    assert isinstance(got, Generate) and isinstance(got.options, GenerationOptions)
    assert got.options == OPTIONS and got.options.sampling.seed == 7 and got.options.stop == ("x",)
    assert got.eos == frozenset({2, 5})
    bad = msgspec.msgpack.encode(
        {"type": "generate", "id": "r", "prompt": [1], "eos": [], "options": {"num_predict": -3}}
    )
    with pytest.raises(RequestError, match="num_predict=-3"):
        decode_command(bad)


def test_a_tick_carries_control_and_plan():
    plan = Plan(add=[Request("r1", [1, 2], OPTIONS, frozenset({2}), True)], drop=["r0"], prefill=[("r1", 2)])
    tick = Tick(control=[Load("c1", "/m"), Shutdown()], plan=plan, ended=["r9"])
    got = decode_tick(encode(tick))
    assert got == tick and isinstance(got.control[1], Shutdown) and got.plan.prefill == [("r1", 2)]
    assert decode_tick(encode(Tick())) == Tick()


def test_a_command_is_not_a_reply_and_unknown_tags_are_refused():
    with pytest.raises(msgspec.ValidationError):
        decode_reply(encode(Cancel("r1")))
    with pytest.raises(msgspec.ValidationError, match="nonsense"):
        decode_command(msgspec.msgpack.encode({"type": "nonsense", "id": "x"}))
    assert decode_failure(encode(RankFailure("rank 1: no file"))).error == "rank 1: no file"


def test_a_new_field_with_a_default_reads_frames_without_it():
    class GenerateV2(msgspec.Struct, tag="generate"):
        id: str
        prompt: list[int]
        options: GenerationOptions
        eos: frozenset[int]
        format: OutputFormat | None = None
        sent: list[int] = msgspec.field(default_factory=list)  # e.g. tokens already streamed, for a replay

    old = encode(COMMANDS[1])
    assert msgspec.msgpack.decode(old, type=GenerateV2).sent == []


def test_frames_arriving_in_pieces_come_out_whole():
    data = b"".join(frame(cmd) for cmd in COMMANDS)
    buffer, got = FrameBuffer(), []
    for i in range(0, len(data), 7):
        buffer.feed(data[i : i + 7])
        got += [decode_command(p) for p in buffer.pop_all()]
    assert got == COMMANDS and buffer.data == b""


def test_a_frame_announcing_too_much_is_refused():
    buffer = FrameBuffer()
    buffer.feed(FRAME_HEADER.pack(MAX_FRAME + 1))
    with pytest.raises(ValueError, match=f"{MAX_FRAME + 1} bytes"):
        buffer.pop_all()


def test_async_reader_reads_frames_then_the_end():
    async def read_all() -> list[bytes | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(frame(Token("a", 1)) + frame(Done("a", FinalStats("stop"))))
        reader.feed_eof()
        return [await read_frame(reader) for _ in range(3)]

    first, second, end = asyncio.run(read_all())
    assert decode_reply(first) == Token("a", 1) and isinstance(decode_reply(second), Done) and end is None
